//! `lcfs man` and `lcfs completions` (issue 13): man pages for lcfs and each command, and
//! completion scripts, generated from the same definitions as `--help`. No root needed.

use std::process::Command;

const LCFS: &str = env!("CARGO_BIN_EXE_lcfs");

#[test]
fn man_pages_are_written_for_every_command() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = Command::new(LCFS)
        .args(["man", dir.path().to_str().unwrap()])
        .output()
        .expect("run lcfs man");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (page, must) in [
        ("lcfs.1", "serve"),
        ("lcfs-serve.1", "--rate"),
        ("lcfs-copy.1", "--keep-setuid"),
        ("lcfs-prefetch.1", "--pin"),
        ("lcfs-mount.1", "--wait"),
        ("lcfs-umount.1", "MOUNTPOINT"),
        ("lcfs-keygen.1", "keyfile"),
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page} was not written: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is not roff"
        );
        // roff escapes dashes.
        assert!(
            text.replace("\\-", "-").contains(must),
            "{page} does not mention {must}"
        );
    }
}

#[test]
fn completion_scripts_are_valid_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(LCFS)
            .args(["completions", shell])
            .output()
            .expect("run lcfs completions");
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).expect("UTF-8");
        assert!(
            script.contains("prefetch") && script.contains("iface"),
            "{shell}"
        );
        if shell == "bash" {
            // bash -n parses without running.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("lcfs.bash");
            std::fs::write(&path, &script).unwrap();
            let check = Command::new("bash")
                .args(["-n", path.to_str().unwrap()])
                .output()
                .expect("bash");
            assert!(
                check.status.success(),
                "the bash completion does not parse: {}",
                String::from_utf8_lossy(&check.stderr)
            );
            // And it completes: the subcommands after `lcfs `.
            let probe = format!(
                "source {}; COMP_WORDS=(lcfs pre); COMP_CWORD=1; _lcfs lcfs pre lcfs; echo \"${{COMPREPLY[@]}}\"",
                path.display()
            );
            let got = Command::new("bash").args(["-c", &probe]).output().unwrap();
            let got = String::from_utf8_lossy(&got.stdout);
            assert!(
                got.contains("prefetch"),
                "bash completes `lcfs pre` to: {got:?}"
            );
        }
    }
}
