//! etcd server for tests (being written).

use anyhow::Result;

use super::{Ctx, Started};

/// Starts etcd (not provisioned yet: no env exported).
pub fn start(_ctx: &Ctx) -> Result<Started> {
    Ok(Started::default())
}
