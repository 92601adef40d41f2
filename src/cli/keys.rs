//! `pcf keys rotate`: every user's data key re-wrapped under the newest key-encryption key.

use crate::app::Storage;
use crate::config::Config;

use super::args::KeysCommand;

/// Keys re-wrapped per statement batch.
const ROTATION_BATCH: u32 = 500;

pub async fn keys(config: Config, command: KeysCommand) -> anyhow::Result<()> {
    let Storage { keys, .. } = crate::app::open_store(&config).await?;
    match command {
        KeysCommand::Rotate => {
            let current = keys.keyring().current_id().to_owned();
            let bar = super::progress_bar(&format!("rotate to {current}"), "keys");
            bar.set_length(keys.count_to_rotate().await?);
            let mut rotated = 0;
            loop {
                let n = keys.rotate_some(ROTATION_BATCH).await?;
                if n == 0 && keys.count_to_rotate().await? == 0 {
                    break;
                }
                rotated += n;
                bar.inc(n);
            }
            bar.finish();
            let in_use = keys.kek_ids_in_use().await?;
            println!(
                "{rotated} data keys re-wrapped under the KEK {current:?}; KEKs in use: {}",
                in_use.join(", ")
            );
            Ok(())
        }
    }
}
