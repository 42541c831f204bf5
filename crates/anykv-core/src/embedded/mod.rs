//! Building blocks for drivers that keep their data in this process (the
//! memory and redb drivers use both; a third-party embedded driver can too).
//!
//! - [`hub`]: routes each committed event only to the watches whose target
//!   matches, with bounded per-watch buffers and replay from the driver's
//!   event log for a watch that fell behind.
//! - [`session`]: sessions and their ephemeral keys over the driver's own
//!   session records (a [`session::Ledger`]), with the renewal task.

pub mod hub;
pub mod session;
