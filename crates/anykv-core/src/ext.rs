//! Convenience methods on every [`Store`], so drivers implement only the trait.

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    election::Election,
    error::{Error, Result},
    key::{Key, Prefix},
    mirror::{JsonMirror, Mirror},
    store::Store,
    types::{PutOptions, Version},
};

/// Typed and string-keyed helpers, implemented for every [`Store`].
///
/// ```no_run
/// # async fn demo(store: &anykv_core::Kv) -> anykv_core::Result<()> {
/// use anykv_core::StoreExt;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Limits { max_conns: u32 }
/// store.put_json("svc/limits", &Limits { max_conns: 64 }).await?;
/// let limits: Option<Limits> = store.get_json("svc/limits").await?;
/// let mode = store.get_or("svc/mode", "normal").await?;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait StoreExt: Store {
    /// The value of `key`, validating the key.
    async fn value(&self, key: &str) -> Result<Option<Bytes>> {
        let key = Key::new(key)?;
        Ok(self.get(&key).await?.map(|kv| kv.value))
    }

    /// The value of `key`, or `default` if it is absent.
    async fn get_or(&self, key: &str, default: impl Into<Bytes> + Send) -> Result<Bytes> {
        Ok(self.value(key).await?.unwrap_or_else(|| default.into()))
    }

    /// Writes `value` unconditionally.
    async fn set(&self, key: &str, value: impl Into<Bytes> + Send) -> Result<Version> {
        let key = Key::new(key)?;
        self.put(&key, value.into(), PutOptions::default()).await
    }

    /// Reads and decodes a JSON value.
    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.value(key).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Codec {
                    key: key.to_owned(),
                    source: Box::new(e),
                }),
        }
    }

    /// Encodes and writes a JSON value.
    async fn put_json<T: Serialize + Sync>(&self, key: &str, value: &T) -> Result<Version> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Codec {
            key: key.to_owned(),
            source: Box::new(e),
        })?;
        self.set(key, bytes).await
    }

    /// A local, always-current copy of `prefix`: returns once the first
    /// snapshot is applied and the watch runs. See [`Mirror`].
    ///
    /// ```no_run
    /// # async fn demo(kv: anykv_core::Kv) -> anykv_core::Result<()> {
    /// use anykv_core::{Prefix, StoreExt};
    /// let members = kv.mirror(&Prefix::new("members")?).await?;
    /// for kv in members.list(&Prefix::root()) {
    ///     println!("{} = {:?}", kv.key, kv.value);
    /// }
    /// # Ok(()) }
    /// ```
    async fn mirror(&self, prefix: &Prefix) -> Result<Mirror>
    where
        Self: Clone + Sized,
    {
        Mirror::start(self.clone(), prefix.clone()).await
    }

    /// The election named `name`: candidates are ephemeral keys one level
    /// below it. See [`Election`]; needs sessions (`Capabilities::sessions`).
    fn election(&self, name: &Key) -> Election<Self>
    where
        Self: Clone + Sized,
    {
        Election::new(self.clone(), name.clone())
    }

    /// A [`mirror`](StoreExt::mirror) whose values are JSON documents of
    /// type `T`, decoded when read; a value that does not decode is an error
    /// for its key only.
    async fn mirror_json<T: DeserializeOwned + Send + 'static>(
        &self,
        prefix: &Prefix,
    ) -> Result<JsonMirror<T>>
    where
        Self: Clone + Sized,
    {
        Ok(JsonMirror::new(self.mirror(prefix).await?))
    }
}

impl<S: Store + ?Sized> StoreExt for S {}
