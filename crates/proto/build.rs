//! Compiles every `.proto` under the top-level `proto/` once, for all crates.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = ["common", "recommender", "admin", "model_admin", "feature", "recall", "rank", "rerank"]
        .iter()
        .map(|name| proto_root.join(format!("recsys/v1/{name}.proto")))
        .collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // A vendored protoc keeps the build free of a system install step.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("recsys_descriptor.bin"))
        .compile_protos(&files, &[proto_root])?;
    Ok(())
}
