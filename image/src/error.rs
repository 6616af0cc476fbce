//! What can go wrong in an import, one variant per failure, each naming what was wrong.

use std::io;
use std::path::PathBuf;

use graphdriver::LayerId;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an import (or reading an image) failed.
///
/// Every variant names the thing that was wrong: the image path, the file or blob inside the
/// image (a path relative to the image, never the target of a link out of it), the digests
/// expected and found, or the layer. Underlying errors are kept as [`source`](std::error::Error::source)
/// and not repeated in the message. After any of these errors from [`import`](crate::import)
/// the store holds the layers it held before.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image path (the caller's own argument) could not be opened or read.
    #[error("open {}", path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image path is neither a directory nor a regular file.
    #[error("{}: expected an image directory or a tar file", path.display())]
    NotAnImage {
        /// The image path.
        path: PathBuf,
    },
    /// The image tar is malformed or over one of this crate's limits.
    #[error("{}: {problem}", path.display())]
    ImageTar {
        /// The image tar.
        path: PathBuf,
        /// What is wrong with it.
        problem: TarProblem,
    },
    /// The image tar could not be read.
    #[error("read {}", path.display())]
    ReadImageTar {
        /// The image tar.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A path inside the image (in a manifest or a link) is absolute, leaves the image, is empty
    /// or is not UTF-8.
    #[error("path {path:?} in the image {reason}")]
    InvalidPath {
        /// The path as the image gives it.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The image has no file of that name.
    #[error("the image has no file {name}")]
    NoFile {
        /// The path inside the image.
        name: String,
    },
    /// A symlink or tar link inside the image points outside it; it is never followed.
    #[error("{name} in the image is a link that leaves the image; refused")]
    LinkLeavesImage {
        /// The link's path inside the image.
        name: String,
    },
    /// Too many links to follow to reach a file.
    #[error("{name} in the image: too many levels of links")]
    TooManyLinks {
        /// The path inside the image that was asked for.
        name: String,
    },
    /// A file the import must read is not a regular file (a FIFO, a device, a directory…); it
    /// is refused before any byte of it is read.
    #[error("{name} in the image is not a regular file (found {found})")]
    NotRegularFile {
        /// The path inside the image.
        name: String,
        /// What it is.
        found: String,
    },
    /// A path inside the image goes through something that is not a directory.
    #[error("{name} in the image: expected a directory, found {found}")]
    NotADirectory {
        /// The path inside the image.
        name: String,
        /// What it is.
        found: String,
    },
    /// An operation on a file inside the image failed.
    #[error("{op} {name} in the image")]
    InImage {
        /// What was being done ("open", "stat", "read symlink").
        op: &'static str,
        /// The path inside the image.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading a JSON document of the image failed.
    #[error("read {name}")]
    ReadJson {
        /// The path inside the image.
        name: String,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// A JSON document (index, manifest, config) is larger than [`MAX_JSON`](crate::MAX_JSON).
    #[error("{name}: {size} bytes, expected at most {limit} for a JSON document")]
    JsonTooLarge {
        /// The path inside the image, or the blob's digest.
        name: String,
        /// Its size, as found or as declared.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A blob is longer than its descriptor declares; it was not read further.
    #[error(
        "blob {blob}: longer than its declared size of {declared} bytes (found at least {found} bytes)"
    )]
    LongerThanDeclared {
        /// The blob: digest and path inside the image.
        blob: String,
        /// The size its descriptor declares.
        declared: u64,
        /// The bytes found (the file's length, or how far it was read).
        found: u64,
    },
    /// A blob is shorter than its descriptor declares.
    #[error("blob {blob}: size mismatch: declared {declared} bytes, found {found}")]
    SizeMismatch {
        /// The blob: digest and path inside the image.
        blob: String,
        /// The size its descriptor declares.
        declared: u64,
        /// The bytes it holds.
        found: u64,
    },
    /// A JSON document of the image is not what it should be.
    #[error("parse {name}")]
    Parse {
        /// The path inside the image.
        name: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A digest is not `sha256:` followed by 64 lowercase hex digits.
    #[error("{what}: expected a digest sha256:<64 hex digits>, found {found:?}")]
    InvalidDigest {
        /// Where the digest was found.
        what: &'static str,
        /// The digest as found.
        found: String,
    },
    /// A blob's content does not hash to the digest its descriptor (or its name) gives.
    #[error(
        "blob {blob}: digest mismatch: expected {expected}, found {found}; the image is corrupt"
    )]
    DigestMismatch {
        /// The path of the blob inside the image.
        blob: String,
        /// The digest the image declares.
        expected: String,
        /// The digest of the bytes read.
        found: String,
    },
    /// A layer's uncompressed content does not hash to the DiffID of the image config.
    #[error(
        "blob {blob}: uncompressed digest (DiffID) mismatch: expected {expected} from the image config, found {found}; the image is corrupt"
    )]
    DiffIdMismatch {
        /// The path of the layer blob inside the image.
        blob: String,
        /// The DiffID from the config.
        expected: String,
        /// The digest of the uncompressed bytes.
        found: String,
    },
    /// Neither `index.json` nor `manifest.json` is there.
    #[error(
        "expected an OCI image layout (index.json) or a `docker save` archive (manifest.json), found neither"
    )]
    UnknownLayout,
    /// An index lists no manifests.
    #[error("{name} lists no manifests")]
    EmptyIndex {
        /// The index: `index.json` or a nested index's path.
        name: String,
    },
    /// `manifest.json` lists no images.
    #[error("manifest.json lists no images")]
    NoImages,
    /// Indexes nest deeper than this crate follows.
    #[error("index.json: image indexes nest too deeply")]
    NestedTooDeep,
    /// No image of the OCI layout has the name asked for.
    #[error("the image layout has no image named {name:?}; it has: {}", .available.join(", "))]
    NoSuchName {
        /// The name asked for.
        name: String,
        /// The images the layout has.
        available: Vec<String>,
    },
    /// No image of the `docker save` archive has the tag asked for.
    #[error("manifest.json has no image tagged {tag:?}; it has: {}", .available.join(", "))]
    NoSuchTag {
        /// The tag asked for.
        tag: String,
        /// The images the archive has.
        available: Vec<String>,
    },
    /// The name asked for matches several images of the layout.
    #[error("{name:?} names {} images of the layout: {}; give the exact name", .images.len(), .images.join(", "))]
    AmbiguousName {
        /// The name asked for.
        name: String,
        /// The images it matches.
        images: Vec<String>,
    },
    /// The layout holds several images and no name chose one.
    #[error("the image layout holds {} images; choose one with PATH:NAME: {}", .images.len(), .images.join(", "))]
    SeveralImages {
        /// The images of the layout.
        images: Vec<String>,
    },
    /// The `docker save` archive holds several images and no tag chose one.
    #[error("manifest.json lists {} images; choose one with PATH:TAG: {}", .images.len(), .images.join(", "))]
    SeveralTaggedImages {
        /// The images of the archive.
        images: Vec<String>,
    },
    /// The manifest and the config disagree on the number of layers.
    #[error("{manifest} lists {layers} layers but the config has {diff_ids} diff_ids")]
    LayerCount {
        /// Which manifest ("the manifest" or "manifest.json").
        manifest: &'static str,
        /// Layers in the manifest.
        layers: usize,
        /// DiffIDs in the config.
        diff_ids: usize,
    },
    /// A layer's media type is not a tar, tar+gzip or tar+zstd layer.
    #[error(
        "layer {digest}: unsupported media type {media_type:?} (expected a tar, tar+gzip or tar+zstd layer)"
    )]
    UnsupportedMediaType {
        /// The layer's digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A layer blob (or a layer stream) could not be read.
    #[error("read blob {blob}")]
    ReadBlob {
        /// The path of the blob inside the image, or what the stream is.
        blob: String,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// A layer blob is in no format the importer knows (not a tar, gzip, zstd, xz or bzip2
    /// stream), or its first bytes could not be read.
    #[error("read blob {blob}")]
    Decompress {
        /// The path of the blob inside the image.
        blob: String,
        /// The decompressor's error.
        #[source]
        source: archive::Error,
    },
    /// More than [`MAX_TRAILING`](crate::MAX_TRAILING) bytes follow the end of a layer tar.
    #[error("more than {limit} bytes follow the end of the tar")]
    TrailingData {
        /// The limit.
        limit: u64,
    },
    /// A chain id is not a valid layer id (cannot happen for a SHA-256 chain id).
    #[error("chain id {chain_id} is not a valid layer id")]
    ChainId {
        /// The chain id.
        chain_id: String,
        /// The driver's refusal.
        #[source]
        source: graphdriver::Error,
    },
    /// The driver or its store failed on a layer.
    #[error("{action} layer {id}")]
    Layer {
        /// What was being done ("create", "record the DiffID of", …).
        action: &'static str,
        /// The layer.
        id: LayerId,
        /// The driver's error.
        #[source]
        source: graphdriver::Error,
    },
    /// The driver could not apply a layer blob.
    #[error("apply blob {blob} as layer {id}")]
    Apply {
        /// The path of the blob inside the image.
        blob: String,
        /// The layer.
        id: LayerId,
        /// The driver's error.
        #[source]
        source: graphdriver::Error,
    },
    /// A layer with the image's chain id exists but was made from another DiffID (or has no
    /// record of one): it is not reused.
    #[error("layer {id} exists {}, the image needs {needed}: remove it or import into another root", .recorded.as_ref().map_or_else(|| "with no recorded DiffID".to_string(), |d| format!("with DiffID {d}")))]
    ReuseDiffId {
        /// The layer.
        id: LayerId,
        /// Its recorded DiffID.
        recorded: Option<String>,
        /// The DiffID the image needs.
        needed: String,
    },
    /// A layer with the image's chain id exists on another parent: it is not reused.
    #[error("layer {id} exists with parent {}, the image needs parent {}: remove it or import into another root", name(.found), name(.needed))]
    ReuseParent {
        /// The layer.
        id: LayerId,
        /// Its parent.
        found: Option<LayerId>,
        /// The parent the image needs.
        needed: Option<LayerId>,
    },
    /// A layer left half-built by another process could not be removed to build it again.
    #[error("layer {id} exists but is incomplete and could not be removed")]
    Abandoned {
        /// The layer.
        id: LayerId,
        /// The last error creating it.
        #[source]
        source: graphdriver::Error,
    },
}

impl Error {
    /// The kind of this error as a stable snake_case name (the variant's: `digest_mismatch`,
    /// `no_such_tag`, …), for programs that report errors as data. A name is never changed once
    /// given.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Open { .. } => "open",
            Error::NotAnImage { .. } => "not_an_image",
            Error::ImageTar { .. } => "image_tar",
            Error::ReadImageTar { .. } => "read_image_tar",
            Error::InvalidPath { .. } => "invalid_path",
            Error::NoFile { .. } => "no_file",
            Error::LinkLeavesImage { .. } => "link_leaves_image",
            Error::TooManyLinks { .. } => "too_many_links",
            Error::NotRegularFile { .. } => "not_regular_file",
            Error::NotADirectory { .. } => "not_a_directory",
            Error::InImage { .. } => "in_image",
            Error::ReadJson { .. } => "read_json",
            Error::JsonTooLarge { .. } => "json_too_large",
            Error::LongerThanDeclared { .. } => "longer_than_declared",
            Error::SizeMismatch { .. } => "size_mismatch",
            Error::Parse { .. } => "parse",
            Error::InvalidDigest { .. } => "invalid_digest",
            Error::DigestMismatch { .. } => "digest_mismatch",
            Error::DiffIdMismatch { .. } => "diff_id_mismatch",
            Error::UnknownLayout => "unknown_layout",
            Error::EmptyIndex { .. } => "empty_index",
            Error::NoImages => "no_images",
            Error::NestedTooDeep => "nested_too_deep",
            Error::NoSuchName { .. } => "no_such_name",
            Error::NoSuchTag { .. } => "no_such_tag",
            Error::AmbiguousName { .. } => "ambiguous_name",
            Error::SeveralImages { .. } => "several_images",
            Error::SeveralTaggedImages { .. } => "several_tagged_images",
            Error::LayerCount { .. } => "layer_count",
            Error::UnsupportedMediaType { .. } => "unsupported_media_type",
            Error::ReadBlob { .. } => "read_blob",
            Error::Decompress { .. } => "decompress",
            Error::TrailingData { .. } => "trailing_data",
            Error::ChainId { .. } => "chain_id",
            Error::Layer { .. } => "layer",
            Error::Apply { .. } => "apply",
            Error::ReuseDiffId { .. } => "reuse_diff_id",
            Error::ReuseParent { .. } => "reuse_parent",
            Error::Abandoned { .. } => "abandoned",
        }
    }
}

/// What is wrong with an image tar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TarProblem {
    /// A header block's checksum is wrong: this is not a tar.
    #[error(
        "not a tar archive (bad header checksum at offset {offset}); expected an OCI layout or `docker save` tar"
    )]
    NotATar {
        /// The header's offset.
        offset: u64,
    },
    /// The file ends inside a header.
    #[error("truncated tar header at offset {offset}")]
    TruncatedHeader {
        /// The header's offset.
        offset: u64,
    },
    /// The file ends inside a member.
    #[error("truncated tar member at offset {offset}")]
    TruncatedMember {
        /// Where the data ended.
        offset: u64,
    },
    /// A header's size field is not a number.
    #[error("bad size field in the tar header at offset {offset}")]
    BadSize {
        /// The header's offset.
        offset: u64,
    },
    /// A GNU long name or PAX header is over [`MAX_EXTENDED`](crate::MAX_EXTENDED).
    #[error("extended header at offset {offset} is {size} bytes, more than the limit of {limit}")]
    ExtendedTooLarge {
        /// The header's offset.
        offset: u64,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A PAX header is malformed.
    #[error("malformed PAX header at offset {offset}")]
    BadPax {
        /// The header's offset.
        offset: u64,
    },
    /// More entries than [`MAX_ENTRIES`](crate::MAX_ENTRIES).
    #[error("more than {limit} entries")]
    TooManyEntries {
        /// The limit.
        limit: usize,
    },
    /// Entry names add up to more than [`MAX_NAME_BYTES`](crate::MAX_NAME_BYTES).
    #[error("entry names add up to more than {limit} bytes")]
    NamesTooLong {
        /// The limit.
        limit: usize,
    },
    /// A member's data would extend past the end of the file.
    #[error("member {name} extends past the end of the file")]
    MemberPastEnd {
        /// The member.
        name: String,
    },
    /// A member at that offset would extend past the end of the file.
    #[error("a tar member at offset {offset} extends past the end of the file")]
    PastEnd {
        /// The member's offset.
        offset: u64,
    },
}

/// A parent for a message: its id or `none`.
fn name(p: &Option<LayerId>) -> String {
    p.as_ref().map_or("none".to_string(), |p| p.to_string())
}
