//! `snapshot ...`: snapshots of stopped sandboxes.

use chrono::Utc;
use microsandbox::{ExportOptions, Sandbox, Snapshot, SnapshotArtifact};

use crate::args::SnapshotCommand;
use crate::error::{out, CliError, CliResult};
use crate::format::{human_bytes, print_json, relative_time, short_digest, table};

fn json(a: &SnapshotArtifact) -> serde_json::Value {
    serde_json::json!({
        "name": a.name,
        "path": a.path,
        "source_sandbox": a.source_sandbox,
        "image": a.image,
        "image_digest": a.image_digest,
        "size_bytes": a.size_bytes,
        "created_at": a.created_at.to_rfc3339(),
        "digest": a.digest,
    })
}

fn print_one(a: &SnapshotArtifact) -> CliResult<()> {
    out(format!("{} {} {}\n", a.name, a.digest, a.path.display()).as_bytes())
}

pub(crate) async fn cmd_snapshot(c: SnapshotCommand) -> CliResult<u8> {
    match c {
        SnapshotCommand::Create { sandbox, name, to } => {
            let h = Sandbox::get(&sandbox).await?;
            let a = match (to, name) {
                (Some(path), None) => h.snapshot_to(path).await?,
                (None, Some(name)) => h.snapshot(&name).await?,
                _ => {
                    return Err(CliError::Usage(
                        "give a snapshot NAME or --to PATH (one of them)".into(),
                    ))
                }
            };
            print_one(&a)?;
        }
        SnapshotCommand::Ls { json: as_json } => {
            let all = Snapshot::list().await?;
            if as_json {
                print_json(&serde_json::Value::Array(all.iter().map(json).collect()))?;
                return Ok(0);
            }
            let now = Utc::now();
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        a.source_sandbox.clone(),
                        a.image.clone(),
                        human_bytes(a.size_bytes),
                        relative_time(a.created_at, now),
                        short_digest(&a.digest),
                    ]
                })
                .collect();
            out(table(
                &["NAME", "SANDBOX", "IMAGE", "SIZE", "CREATED", "DIGEST"],
                &rows,
            )
            .as_bytes())?;
        }
        SnapshotCommand::Rm { snapshots } => {
            for s in snapshots {
                Snapshot::remove(&s).await?;
            }
        }
        SnapshotCommand::Export {
            snapshot,
            file,
            with_image,
        } => {
            Snapshot::export(&snapshot, &file, ExportOptions { with_image }).await?;
        }
        SnapshotCommand::Import { file, name } => {
            let a = Snapshot::import(&file, name.as_deref()).await?;
            print_one(&a)?;
        }
    }
    Ok(0)
}
