//! Records the commit the crate is built from, for `idgraph_build_info{commit}`: the
//! `IDGRAPH_BUILD_COMMIT` environment variable if set (an image build without `.git`), else
//! `git rev-parse`, else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=IDGRAPH_BUILD_COMMIT");
    let commit = std::env::var("IDGRAPH_BUILD_COMMIT")
        .ok()
        .filter(|commit| !commit.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=IDGRAPH_COMMIT={commit}");
    // A new commit moves the branch's ref (or HEAD itself, when detached).
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        // Only paths that exist: Cargo runs a script again on every build for a missing one.
        for path in ["HEAD", "refs/heads", "packed-refs"] {
            let path = std::path::Path::new(&dir).join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
