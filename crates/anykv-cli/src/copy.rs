//! `anykv copy SRC DST [--prefix P]`: stream `export` of one store into
//! `import` of another, counting on a progress line.
//!
//! Pairs flow one by one from the source to the destination (nothing is
//! collected in memory here), so a copy is as large as the drivers' export
//! and import stream.

use std::io::IsTerminal;

use anykv::{Prefix, Store};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{
    exit::{self, Failure},
    output,
};

/// Copies and prints the number of keys copied.
pub async fn run(src_url: &str, dst_url: &str, prefix: &Prefix) -> Result<u8, Failure> {
    let src = anykv::open(src_url).await?;
    let dst = match anykv::open(dst_url).await {
        Ok(d) => d,
        Err(e) => {
            let _ = src.close().await;
            return Err(e.into());
        }
    };
    let bar = progress_bar();
    let copied = async {
        let counter = bar.clone();
        let pairs = src
            .export(prefix)
            .await?
            .inspect(move |item| {
                if item.is_ok() {
                    counter.inc(1);
                }
            })
            .boxed();
        dst.import(pairs).await
    }
    .await;
    bar.finish_and_clear();
    let closed_src = src.close().await;
    let closed_dst = dst.close().await;
    let n = copied?;
    closed_src?;
    closed_dst?;
    output::println(&n.to_string())?;
    Ok(exit::OK)
}

/// A spinner with a running count on stderr, hidden when stderr is not a
/// terminal (logs and pipes get no control characters).
fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{spinner} copied {human_pos} keys ({per_sec}, {elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
