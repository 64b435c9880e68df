//! `recsysctl bundle verify`: every file the manifest lists is present with its checksum.

use std::path::Path;

pub fn verify(path: &Path) -> anyhow::Result<()> {
    let dir = recsys_bundle::resolve_dir(path)?;
    let manifest = recsys_bundle::read_manifest(&dir)?;
    let mut problems = Vec::new();
    let mut names: Vec<&String> = manifest.files.keys().collect();
    names.sort();
    for name in names {
        let entry = &manifest.files[name];
        match recsys_bundle::tensors::sha256_file(&dir.join(name)) {
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
