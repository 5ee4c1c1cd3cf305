//! The crate's macros.

/// The accessors every service of this crate has (`get_ref`, `get_mut`, `into_inner`), and a
/// `Clone` written by hand so that cloning needs only `S: Clone` (the shared state is an `Arc`)
/// and a clone starts its own `field`s afresh (a reservation is never cloned).
macro_rules! inner_service {
    ($svc:ident $(, $field:ident: $init:expr)*) => {
        impl<S> $svc<S> {
            pub(crate) fn new(inner: S, shared: std::sync::Arc<Shared>) -> Self {
                Self { inner, shared $(, $field: $init)* }
            }

            /// The inner service.
            pub fn get_ref(&self) -> &S {
                &self.inner
            }

            /// The inner service, mutably.
            pub fn get_mut(&mut self) -> &mut S {
                &mut self.inner
            }

            /// The inner service, consuming this one.
            pub fn into_inner(self) -> S {
                self.inner
            }
        }

        impl<S: Clone> Clone for $svc<S> {
            fn clone(&self) -> Self {
                Self {
                    inner: self.inner.clone(),
                    shared: self.shared.clone(),
                    $($field: $init,)*
                }
            }
        }
    };
}
