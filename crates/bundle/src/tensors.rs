//! The bundle's large arrays — vectors, neighbour lists, per-item signals — are
//! safetensors files (a JSON header of dtypes, shapes and byte ranges, then raw
//! little-endian data) that every service memory-maps read-only. Nothing is parsed or
//! copied per item at load, the page cache holds one copy for every process on the node,
//! and only the pages a request touches become resident.
//!
//! A file is checked against the manifest's size and sha256 *before* it is mapped: a
//! mapped file that is shorter than its header says would fault (SIGBUS) on first touch,
//! so a truncated or corrupted file must be refused while it is still an ordinary read.
//! Published bundles are immutable (the pipeline writes a new directory and renames it in),
//! which is what makes the check-then-map sound.

use std::{
    collections::HashMap,
    fs::File,
    io::Read,
    marker::PhantomData,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytemuck::Pod;
use memmap2::{Mmap, MmapOptions};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::{BundleError, Manifest, Result};

/// One verified, memory-mapped safetensors file.
pub struct TensorFile {
    path: PathBuf,
    map: Mmap,
    tensors: HashMap<String, TensorSpan>,
}

struct TensorSpan {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range of the data within the whole file.
    bytes: Range<usize>,
}

impl TensorFile {
    /// Verifies `dir/name` against the manifest (size, then sha256), then maps it.
    pub fn open(dir: &Path, name: &str, manifest: &Manifest) -> Result<Arc<Self>> {
        let path = dir.join(name);
        verify_file(&path, name, manifest)?;
        let file = File::open(&path).map_err(|source| BundleError::Io { path: path.clone(), source })?;
        let map = map_read_only(&file).map_err(|source| BundleError::Io { path: path.clone(), source })?;
        let parsed = SafeTensors::deserialize(&map).map_err(|error| malformed(&path, error.to_string()))?;
        let base = map.as_ptr() as usize;
        let tensors = parsed
            .iter()
            .map(|(tensor_name, view)| {
                let start = view.data().as_ptr() as usize - base;
                let span = TensorSpan {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: start..start + view.data().len(),
                };
                (tensor_name.to_string(), span)
            })
            .collect();
        Ok(Arc::new(Self { path, map, tensors }))
    }

    pub fn contains(&self, tensor: &str) -> bool {
        self.tensors.contains_key(tensor)
    }

    /// A `[rows, cols]` f32 tensor; `cols` must match.
    pub fn matrix(self: &Arc<Self>, tensor: &str, cols: usize) -> Result<Matrix> {
        let span = self.span(tensor)?;
        match span.shape[..] {
            [rows, found] if found == cols => Ok(Matrix { rows, cols, values: self.column(tensor)? }),
            _ => Err(malformed(&self.path, format!("{tensor} has shape {:?}, expected [rows, {cols}]", span.shape))),
        }
    }

    /// A one-dimensional tensor of `T`.
    pub fn column<T: Element>(self: &Arc<Self>, tensor: &str) -> Result<Column<T>> {
        let span = self.span(tensor)?;
        if span.dtype != T::DTYPE {
            return Err(malformed(&self.path, format!("{tensor} is {:?}, expected {:?}", span.dtype, T::DTYPE)));
        }
        // Checked once here, so `Column::as_slice` cannot fail later.
        bytemuck::try_cast_slice::<u8, T>(&self.map[span.bytes.clone()])
            .map_err(|error| malformed(&self.path, format!("{tensor} cannot be read in place: {error:?}")))?;
        Ok(Column {
            storage: Storage::Mapped { file: Arc::clone(self), bytes: span.bytes.clone() },
            _type: PhantomData,
        })
    }

    /// A tensor's shape, for readers of more than one dimension to check.
    pub fn shape(&self, tensor: &str) -> Result<&[usize]> {
        Ok(&self.span(tensor)?.shape)
    }

    fn span(&self, tensor: &str) -> Result<&TensorSpan> {
        self.tensors.get(tensor).ok_or_else(|| malformed(&self.path, format!("no tensor named {tensor}")))
    }
}

/// The one unsafe operation of the workspace: mapping a file. Sound as long as nobody
/// truncates or rewrites the file while it is mapped; bundle files are never written
/// after publication, and `TensorFile::open` has verified the length and contents first.
///
/// The pages are populated at load (they are in the page cache already: the checksum has
/// just read them), so the first requests after SERVING do not each pay for the page
/// faults of a million-item index and miss their deadline.
#[allow(unsafe_code)]
fn map_read_only(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: see above; the map is read-only and private to this process's view.
    unsafe { MmapOptions::new().populate().map(file) }
}

/// Refuses a file whose size or sha256 differs from the manifest's entry (or that the
/// manifest does not list).
pub fn verify_file(path: &Path, name: &str, manifest: &Manifest) -> Result<()> {
    let entry =
        manifest.files.get(name).ok_or_else(|| malformed(path, "the manifest does not list this file".to_string()))?;
    let length = std::fs::metadata(path).map_err(|source| BundleError::Io { path: path.to_path_buf(), source })?.len();
    if length != entry.bytes {
        return Err(malformed(path, format!("{length} bytes where the manifest says {} (truncated?)", entry.bytes)));
    }
    let digest = sha256_file(path)?;
    if digest != entry.sha256 {
        return Err(malformed(path, format!("sha256 {digest} where the manifest says {}", entry.sha256)));
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let io_error = |source| BundleError::Io { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(io_error)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect())
}

fn malformed(path: &Path, reason: String) -> BundleError {
    BundleError::Malformed { path: path.to_path_buf(), reason }
}

/// Element types a tensor can be read as.
pub trait Element: Pod {
    const DTYPE: Dtype;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}

impl Element for f64 {
    const DTYPE: Dtype = Dtype::F64;
}

impl Element for i64 {
    const DTYPE: Dtype = Dtype::I64;
}

impl Element for u32 {
    const DTYPE: Dtype = Dtype::U32;
}

impl Element for i8 {
    const DTYPE: Dtype = Dtype::I8;
}

/// A one-dimensional array, mapped from a bundle file or owned (tests, small tables).
#[derive(Clone)]
pub struct Column<T> {
    storage: Storage<T>,
    _type: PhantomData<T>,
}

#[derive(Clone)]
enum Storage<T> {
    Owned(Arc<[T]>),
    Mapped { file: Arc<TensorFile>, bytes: Range<usize> },
}

impl<T: Element> Column<T> {
    pub fn owned(values: Vec<T>) -> Self {
        Self { storage: Storage::Owned(values.into()), _type: PhantomData }
    }

    pub fn as_slice(&self) -> &[T] {
        match &self.storage {
            Storage::Owned(values) => values,
            // Length and alignment were checked when the column was made.
            Storage::Mapped { file, bytes } => bytemuck::cast_slice(&file.map[bytes.clone()]),
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

impl<T: Element + std::fmt::Debug> std::fmt::Debug for Column<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Column").field("len", &self.len()).finish()
    }
}

/// Dense row-major matrix of f32.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    values: Column<f32>,
}

impl Matrix {
    pub fn owned(rows: usize, cols: usize, values: Vec<f32>) -> Self {
        assert_eq!(values.len(), rows * cols, "a {rows}x{cols} matrix");
        Self { rows, cols, values: Column::owned(values) }
    }

    pub fn row(&self, index: usize) -> &[f32] {
        &self.values.as_slice()[index * self.cols..(index + 1) * self.cols]
    }

    /// Every value, row after row.
    pub fn values(&self) -> &[f32] {
        self.values.as_slice()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::FileEntry;

    /// Writes a safetensors file with the crate's own writer and returns a manifest that
    /// lists it with its true size and checksum.
    pub(crate) fn write(dir: &Path, name: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Manifest {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(tensor, dtype, shape, data)| {
                (tensor.to_string(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap())
            })
            .collect();
        let path = dir.join(name);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let mut manifest = crate::tests::empty_manifest();
        let bytes = std::fs::metadata(&path).unwrap().len();
        manifest.files.insert(name.to_string(), FileEntry { sha256: sha256_file(&path).unwrap(), bytes });
        manifest
    }

    pub(crate) fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_verified_file_is_read_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let manifest =
            write(dir.path(), "t.safetensors", &[("m", Dtype::F32, vec![2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.5]))]);
        let file = TensorFile::open(dir.path(), "t.safetensors", &manifest).unwrap();
        let matrix = file.matrix("m", 2).unwrap();
        assert_eq!((matrix.rows, matrix.row(1)), (2, &[3.0, 4.5][..]));
        let error = file.matrix("m", 3).unwrap_err().to_string();
        assert!(error.contains("shape [2, 2]"), "{error}");
        let error = file.column::<i64>("m").unwrap_err().to_string();
        assert!(error.contains("F32") && error.contains("I64"), "{error}");
        assert!(file.column::<f32>("nope").unwrap_err().to_string().contains("no tensor named nope"));
    }

    #[test]
    fn a_truncated_or_altered_file_is_refused_before_it_is_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write(dir.path(), "t.safetensors", &[("v", Dtype::F32, vec![4], f32_bytes(&[1.0; 4]))]);
        let path = dir.path().join("t.safetensors");
        let bytes = std::fs::read(&path).unwrap();

        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let error = TensorFile::open(dir.path(), "t.safetensors", &manifest).err().unwrap().to_string();
        assert!(error.contains("truncated"), "{error}");

        let mut altered = bytes.clone();
        *altered.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &altered).unwrap();
        let error = TensorFile::open(dir.path(), "t.safetensors", &manifest).err().unwrap().to_string();
        assert!(error.contains("sha256"), "{error}");

        let mut unlisted = manifest.clone();
        unlisted.files.clear();
        std::fs::write(&path, &bytes).unwrap();
        let error = TensorFile::open(dir.path(), "t.safetensors", &unlisted).err().unwrap().to_string();
        assert!(error.contains("does not list"), "{error}");
    }

    #[test]
    fn a_file_whose_header_lies_about_its_data_is_refused() {
        // Consistent with the manifest, but the header claims more data than the file has.
        let dir = tempfile::tempdir().unwrap();
        let header = br#"{"v":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 16]);
        let path = dir.path().join("t.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let mut manifest = crate::tests::empty_manifest();
        manifest.files.insert(
            "t.safetensors".into(),
            FileEntry { sha256: sha256_file(&path).unwrap(), bytes: bytes.len() as u64 },
        );
        assert!(TensorFile::open(dir.path(), "t.safetensors", &manifest).is_err());
    }
}
