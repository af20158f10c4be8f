//! `lcfs keygen`.

use super::args::KeygenArgs;

pub(crate) fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    if let (true, Some(path)) = (args.sign, &args.out) {
        let public = crate::wire::keys::publisher::write_key_pair(path)?;
        eprintln!(
            "wrote a publisher key to {} (mode 0600; give it to `lcfs serve --sign-key`) and its public half to {}.pub",
            path.display(),
            path.display()
        );
        println!("{public}");
        return Ok(());
    }
    match args.out {
        Some(path) => {
            crate::wire::keys::write_keyfile(&path)?;
            eprintln!(
                "wrote a new key to {} (mode 0600): share it with receivers over a secure channel",
                path.display()
            );
        }
        None => println!("{}", crate::wire::keys::new_key_hex()),
    }
    Ok(())
}
