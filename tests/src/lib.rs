//! Integration tests for tower-quota: whole stacks against the simulator. The tests live in `tests/`.
