//! `pull` and `image ...`: the local image store.

use chrono::Utc;
use microsandbox::{error_chain, Image};

use crate::args::{ImageCommand, PullArgs};
use crate::error::{out, say, CliError, CliResult};
use crate::format::{human_bytes, print_json, relative_time, short_digest, table};
use crate::progress::show_progress;

pub(crate) async fn cmd_pull(a: PullArgs) -> CliResult<u8> {
    let opts = a.registry.options(a.policy);
    let info = show_progress(Image::pull_with_progress(&a.reference, opts), None).await?;
    out(format!("{} {}\n", info.reference, info.digest).as_bytes())?;
    Ok(0)
}

pub(crate) async fn cmd_image(c: ImageCommand) -> CliResult<u8> {
    match c {
        ImageCommand::Ls { json } => {
            let images = Image::list().await?;
            if json {
                let v =
                    serde_json::to_value(&images).map_err(|e| CliError::Failed(e.to_string()))?;
                print_json(&v)?;
                return Ok(0);
            }
            let now = Utc::now();
            let rows: Vec<Vec<String>> = images
                .iter()
                .map(|i| {
                    vec![
                        i.reference.clone(),
                        short_digest(&i.digest),
                        i.layer_count.to_string(),
                        human_bytes(i.size),
                        i.created_at
                            .map(|t| relative_time(t, now))
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            out(table(&["REFERENCE", "DIGEST", "LAYERS", "SIZE", "PULLED"], &rows).as_bytes())?;
        }
        ImageCommand::Inspect { reference } => {
            let d = Image::inspect(&reference).await?;
            let v = serde_json::to_value(&d).map_err(|e| CliError::Failed(e.to_string()))?;
            out(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()).as_bytes())?;
        }
        ImageCommand::Rm { references } => {
            let mut failed = false;
            for r in &references {
                match Image::remove(r).await {
                    Ok(()) => out(format!("{r}\n").as_bytes())?,
                    Err(e) => {
                        say(&format!("msb: error: {}", error_chain(&e)));
                        failed = true;
                    }
                }
            }
            return Ok(u8::from(failed));
        }
        ImageCommand::Load { tag, file } => {
            for i in Image::load(&file, tag.as_deref()).await? {
                out(format!("{} {}\n", i.reference, i.digest).as_bytes())?;
            }
        }
        ImageCommand::Save { output, references } => {
            let refs: Vec<&str> = references.iter().map(String::as_str).collect();
            Image::save(&refs, &output).await?;
        }
        ImageCommand::Prune => {
            let r = Image::prune().await?;
            out(format!(
                "removed {} blobs, {} layers, {} partial downloads; freed {}\n",
                r.blobs_removed,
                r.layers_removed,
                r.downloads_removed,
                human_bytes(r.bytes_freed)
            )
            .as_bytes())?;
        }
    }
    Ok(0)
}
