//! Create a sandbox, run commands in it, move files, stop it.
//!
//! ```text
//! cargo run -p microsandbox --example quickstart
//! ```

use microsandbox::{MicrosandboxResult, Sandbox};

#[tokio::main]
async fn main() -> MicrosandboxResult<()> {
    let sb = Sandbox::builder("quickstart")
        .cpus(1)
        .memory(512)
        .env("GREETING", "hello")
        .volume("/scratch", |v| v.tmpfs().size(64))
        .replace()
        .create()
        .await?;

    let out = sb.exec("echo", ["hello from the guest"]).await?;
    print!("{}", out.stdout()?);

    let out = sb.shell("echo $GREETING; uname -r; exit 3").await?;
    println!("{}exit code {}", out.stdout()?, out.exit_code());

    sb.fs()
        .write("/scratch/note.txt", "written by the host\n")
        .await?;
    print!("{}", sb.fs().read_to_string("/scratch/note.txt").await?);

    sb.stop().await?;
    Sandbox::remove("quickstart").await?;
    Ok(())
}
