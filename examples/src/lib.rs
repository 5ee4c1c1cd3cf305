//! Examples for tower-quota: see `examples/`. This library is empty on purpose.
