//! Finding the holes of a regular file (`SEEK_DATA`/`SEEK_HOLE`) for a sparse member.

use super::*;

pub(crate) fn ftype(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

#[allow(clippy::unnecessary_cast)]
pub(crate) fn st_size(st: &Stat) -> u64 {
    u64::try_from(st.st_size).unwrap_or(0)
}

/// The data layout of the regular file open as `fd` (`lstat` `st`) when it has holes, or `None`
/// for a dense file (and on filesystems without `SEEK_DATA`/`SEEK_HOLE`, which report one data
/// segment). Files whose allocated blocks cover their size are not probed at all. Leaves the
/// file offset at 0.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn sparse_layout(fd: BorrowedFd<'_>, st: &Stat) -> io::Result<Option<SparseMap>> {
    let size = st_size(st);
    let allocated = u64::try_from(st.st_blocks)
        .unwrap_or(u64::MAX)
        .saturating_mul(512);
    if size == 0 || allocated >= size {
        return Ok(None);
    }
    let res = probe_segments(fd, size);
    rustix::fs::seek(fd, SeekFrom::Start(0))?;
    let segs = match res? {
        Some(s) => s,
        None => return Ok(None),
    };
    Ok(Some(SparseMap {
        real_size: size,
        segs,
    }))
}

/// The data segments of the first `size` bytes of `fd`, `None` when there is no hole.
pub(crate) fn probe_segments(fd: BorrowedFd<'_>, size: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    let mut segs: Vec<(u64, u64)> = Vec::new();
    // Holes shorter than this are written as data (only raised past MAX_EXPORT_SEGMENTS).
    let mut min_hole = 0u64;
    let mut off = 0u64;
    while off < size {
        let data = match rustix::fs::seek(fd, SeekFrom::Data(off)) {
            Ok(d) => d,
            // No data after `off`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            // No SEEK_DATA here: treat the file as dense.
            Err(rustix::io::Errno::INVAL) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match rustix::fs::seek(fd, SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            break;
        }
        match segs.last_mut() {
            Some(last) if data - (last.0 + last.1) < min_hole => last.1 = hole - last.0,
            _ => segs.push((data, hole - data)),
        }
        if segs.len() > MAX_EXPORT_SEGMENTS {
            while segs.len() > MAX_EXPORT_SEGMENTS / 2 {
                min_hole = min_hole.saturating_mul(2).max(4096);
                coalesce(&mut segs, min_hole);
            }
        }
        off = hole;
    }
    if segs.len() == 1 && segs[0] == (0, size) {
        return Ok(None);
    }
    if segs.last().is_none_or(|&(o, l)| o + l < size) {
        segs.push((size, 0));
    }
    Ok(Some(segs))
}

/// Merges segments separated by holes shorter than `min_hole`.
pub(crate) fn coalesce(segs: &mut Vec<(u64, u64)>, min_hole: u64) {
    let mut kept = 0;
    for i in 0..segs.len() {
        let (o, l) = segs[i];
        if kept > 0 {
            let (po, pl) = segs[kept - 1];
            if o - (po + pl) < min_hole {
                segs[kept - 1].1 = o + l - po;
                continue;
            }
        }
        segs[kept] = (o, l);
        kept += 1;
    }
    segs.truncate(kept);
}
