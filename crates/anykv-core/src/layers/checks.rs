//! Capability and argument checks, before any I/O.
//!
//! Rejects what the backend cannot do (`Unsupported`: TTLs, locks,
//! snapshot, compact) and malformed arguments (`InvalidArgument`,
//! `ValueTooLarge`) without calling the layers below, so that a rejected
//! argument says nothing about the backend's health (this layer sits above
//! liveness).

use std::{collections::HashSet, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::{
    capability::Capabilities,
    error::{Error, Result},
    key::Key,
    layer::{Context, Inner, Layer, Next, Standard},
    layers::request::{Request, Response},
    session::SessionBackend,
    types::{Condition, Op, Version},
};

/// The standard checks layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChecksLayer;

#[async_trait]
impl Layer for ChecksLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
        self.around(req, next).await
    }
}

impl Standard for ChecksLayer {
    async fn around<N: Inner>(&self, req: Request, next: N) -> Result<Response> {
        let ctx = next.context();
        let check = Checks {
            backend: ctx.backend(),
            caps: ctx.capabilities(),
        };
        let req = check.request(req)?;
        match next.run(req).await? {
            Response::Session(session) => {
                let (backend, max) = (check.backend, check.caps.max_value_size);
                Ok(Response::Session(session.map_backend(|inner| {
                    Arc::new(CheckedSession {
                        inner,
                        backend,
                        max,
                    })
                })))
            }
            other => Ok(other),
        }
    }
}

/// The checks layer's verdict on a request (the request if it may go on),
/// for the fused fast path.
pub(crate) fn check(ctx: &Context, req: Request) -> Result<Request> {
    Checks {
        backend: ctx.backend(),
        caps: ctx.capabilities(),
    }
    .request(req)
}

struct Checks<'a> {
    backend: &'static str,
    caps: &'a Capabilities,
}

impl Checks<'_> {
    /// The request if it may go on (an import's stream gets checked pair by pair).
    fn request(&self, req: Request) -> Result<Request> {
        let req = match req {
            Request::Import { pairs } => {
                let (backend, max) = (self.backend, self.caps.max_value_size);
                let pairs = pairs.map(move |s| {
                    s.and_then(move |p| {
                        futures::future::ready(
                            value_fits(backend, max, &p.key, &p.value).map(|()| p),
                        )
                    })
                    .boxed()
                });
                return Ok(Request::Import { pairs });
            }
            other => other,
        };
        match &req {
            Request::Put { key, value, opts } => {
                self.value(key, value)?;
                self.ttl(opts.ttl)?;
            }
            Request::Delete {
                condition: Condition::IfAbsent,
                ..
            } => return Err(self.invalid("delete cannot be conditional on absence")),
            Request::Lock { opts, .. } | Request::TryLock { opts, .. } => {
                self.locks(req.name())?;
                if opts.ttl.is_zero() {
                    return Err(self.invalid("lock ttl must be positive"));
                }
            }
            Request::LockHolder { .. } => self.locks("lock_holder")?,
            Request::Session { opts } => {
                if self.caps.sessions.is_none() {
                    return Err(self.unsupported("session"));
                }
                if opts.ttl.is_zero() {
                    return Err(self.invalid("session ttl must be positive"));
                }
            }
            Request::Atomic { checks, ops } => self.atomic(checks.len(), ops)?,
            Request::Snapshot { prefixes } => {
                if self.caps.snapshot.is_none() {
                    return Err(self.unsupported("snapshot"));
                }
                if prefixes.is_empty() {
                    return Err(self.invalid("snapshot needs at least one prefix"));
                }
            }
            Request::Compact { .. } if !self.caps.compact => {
                return Err(self.unsupported("compact"));
            }
            _ => {}
        }
        Ok(req)
    }

    fn atomic(&self, checks: usize, ops: &[Op]) -> Result<()> {
        if let Some(max) = self.caps.max_atomic_ops
            && checks + ops.len() > max
        {
            return Err(self.invalid(format!(
                "atomic has {} checks and operations; this backend takes at most {max}",
                checks + ops.len()
            )));
        }
        let mut written = HashSet::new();
        for op in ops {
            if !written.insert(op.key().as_str()) {
                return Err(self.invalid(format!("atomic writes {} twice", op.key())));
            }
            if let Op::Put(k, v) = op {
                self.value(k, v)?;
            }
        }
        Ok(())
    }

    fn value(&self, key: &Key, value: &Bytes) -> Result<()> {
        value_fits(self.backend, self.caps.max_value_size, key, value)
    }

    fn ttl(&self, ttl: Option<Duration>) -> Result<()> {
        match ttl {
            None => Ok(()),
            Some(_) if self.caps.ttl.is_none() => Err(self.unsupported("ttl")),
            Some(t) if t.is_zero() => Err(self.invalid("ttl must be positive")),
            Some(_) => Ok(()),
        }
    }

    fn locks(&self, operation: &'static str) -> Result<()> {
        if self.caps.locks {
            Ok(())
        } else {
            Err(self.unsupported(operation))
        }
    }

    fn unsupported(&self, operation: &'static str) -> Error {
        Error::Unsupported {
            backend: self.backend,
            operation,
        }
    }

    fn invalid(&self, message: impl Into<String>) -> Error {
        Error::InvalidArgument {
            backend: self.backend,
            message: message.into(),
        }
    }
}

/// A session's puts, checked like [`Store::put`](crate::Store::put)'s.
struct CheckedSession {
    inner: Arc<dyn SessionBackend>,
    backend: &'static str,
    max: usize,
}

#[async_trait]
impl SessionBackend for CheckedSession {
    fn id(&self) -> String {
        self.inner.id()
    }

    async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        value_fits(self.backend, self.max, key, &value)?;
        self.inner.put(key, value, condition).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

fn value_fits(backend: &'static str, max: usize, key: &Key, value: &Bytes) -> Result<()> {
    if value.len() > max {
        return Err(Error::ValueTooLarge {
            backend,
            key: key.to_string(),
            size: value.len(),
            max,
        });
    }
    Ok(())
}
