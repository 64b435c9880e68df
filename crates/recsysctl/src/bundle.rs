//! `recsysctl bundle verify`: every file the manifest lists is present with its checksum.

use std::{io::Read, path::Path};

use sha2::{Digest, Sha256};

pub fn verify(path: &Path) -> anyhow::Result<()> {
    let dir = recsys_bundle::resolve_dir(path)?;
    let manifest = recsys_bundle::read_manifest(&dir)?;
    let mut problems = Vec::new();
    let mut names: Vec<&String> = manifest.files.keys().collect();
    names.sort();
    for name in names {
        let entry = &manifest.files[name];
        match sha256_of(&dir.join(name)) {
            Ok(digest) if digest == entry.sha256 => println!("ok       {name}"),
            Ok(_) => problems.push(format!("checksum mismatch: {name}")),
            Err(error) => problems.push(format!("unreadable: {name}: {error}")),
        }
    }
    for problem in &problems {
        println!("PROBLEM  {problem}");
    }
    if problems.is_empty() {
        println!("bundle {} at {} is intact ({} files)", manifest.version, dir.display(), manifest.files.len());
        Ok(())
    } else {
        anyhow::bail!("bundle {} has {} problem(s)", manifest.version, problems.len())
    }
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect())
}
