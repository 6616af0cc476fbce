//! The tar format itself, both directions: [`reader`] decodes a layer stream into entries (with
//! [`header`], the field parsing both share), [`writer`] encodes entries into an export's
//! output. Everything else in this crate works on entries and trees, not on tar bytes.

pub(crate) mod header;
pub(crate) mod reader;
pub(crate) mod writer;
