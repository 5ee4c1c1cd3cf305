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

/// The shell of a layer whose settings and state live in a
/// [`Configured`](crate::util::Configured) field `inner` (settings `Config`, state `Shared`):
/// `from_config`, the state made by `make` on first use (`shared`), the setters' `with` (which
/// runs `check` on the new settings, if given) and the `Layer` impl.
macro_rules! configured_layer {
    ($layer:ident => $service:ident, make: $make:expr $(, check: $check:expr)?) => {
        impl $layer {
            fn from_config(config: Config) -> Self {
                Self {
                    inner: crate::util::Configured::new(config),
                }
            }

            /// The state, made on first use.
            pub(super) fn shared(&self) -> std::sync::Arc<Shared> {
                self.inner.state($make)
            }

            #[track_caller]
            fn with(self, f: impl FnOnce(&mut Config)) -> Self {
                Self {
                    inner: self.inner.with(|c| {
                        f(c);
                        $(($check)(&*c);)?
                    }),
                }
            }
        }

        impl<S> tower::Layer<S> for $layer {
            type Service = $service<S>;

            fn layer(&self, inner: S) -> $service<S> {
                $service::new(inner, self.shared())
            }
        }
    };
}
