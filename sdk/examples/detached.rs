//! A sandbox that outlives this program: create it detached with labels and limits, find
//! it again by label, reconnect, stop and remove it.
//!
//! ```text
//! cargo run -p microsandbox --example detached
//! ```

use microsandbox::{MicrosandboxResult, Sandbox, SandboxFilter};

#[tokio::main]
async fn main() -> MicrosandboxResult<()> {
    let sb = Sandbox::builder("worker-1")
        .label("team", "data")
        .idle_timeout(300) // stopped by its VMM after 5 idle minutes
        .max_duration(3600) // and after an hour in any case
        .replace()
        .create_detached()
        .await?;
    println!(
        "created {} (owns lifecycle: {})",
        sb.name(),
        sb.owns_lifecycle()
    );
    drop(sb); // still running

    for h in Sandbox::list_with(SandboxFilter::new().with_label("team", "data")).await? {
        println!("{}: {} since {:?}", h.name(), h.status(), h.created_at());
    }

    let h = Sandbox::get("worker-1").await?;
    let sb = h.connect().await?;
    println!("{}", sb.shell("uptime").await?.stdout()?.trim());

    sb.stop().await?;
    println!("now {}", Sandbox::get("worker-1").await?.status());
    Sandbox::remove("worker-1").await?;
    Ok(())
}
