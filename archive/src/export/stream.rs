//! The stream side of an export: the producer thread's output buffer ([`Out`]) and the
//! [`TarStream`] a caller reads, handed over in bounded chunks.

use super::*;

/// Size of the buffers handed from the producer thread to the reader. Headers and file data
/// are written straight into them (file contents are `read(2)` into place), and a buffer is sent
/// only when full, so a tree of small files costs one hand-over per 256 KiB, not one per file.
pub(crate) const CHUNK: usize = 256 * 1024;

/// Buffers in flight between producer and reader (beyond the one each side is working on).
pub(crate) const CHANNEL_DEPTH: usize = 4;

pub(crate) type Skipped = Arc<Mutex<Vec<(PathBuf, String)>>>;

pub(crate) enum Msg {
    Data(Vec<u8>),
    Failed(Error),
    End,
}

/// A layer tar being produced in the background; read it like a file.
///
/// Reading returns the tar bytes in order and then end-of-file once the archive, including its
/// two zero end blocks, is complete.
///
/// The tar is produced by a background thread and handed over in 256 KiB buffers through a
/// channel holding at most four of them (consumed buffers are recycled), so memory stays
/// bounded (about 1.5 MiB) whatever the tree size. A failure in the producer (a file vanished,
/// a read error) makes `read` return an [`std::io::Error`] wrapping the [`crate::Error`]
/// (`get_ref()` / `into_inner()` give it back): the stream is never silently truncated.
/// Dropping the stream early stops the producer at its next hand-over, and the drop waits for
/// it to end.
pub struct TarStream {
    pub(crate) rx: Option<Receiver<Msg>>,
    pub(crate) recycle: Sender<Vec<u8>>,
    pub(crate) cur: Vec<u8>,
    pub(crate) pos: usize,
    pub(crate) finished: bool,
    pub(crate) failed: Option<String>,
    pub(crate) skipped: Skipped,
    pub(crate) thread: Option<JoinHandle<()>>,
}

impl TarStream {
    /// The entries left out of the archive (sockets, xattrs with non-UTF-8 names), each with
    /// the reason, as paths relative to the root. Complete once `read` has returned end-of-file.
    /// Each is also warned about through `tracing` when it is skipped.
    pub fn skipped(&self) -> Vec<(PathBuf, String)> {
        match self.skipped.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn spawn<F>(job: F) -> TarStream
    where
        F: FnOnce(&mut TarWriter, &Skipped) -> Result<()> + Send + 'static,
    {
        let (tx, rx) = sync_channel(CHANNEL_DEPTH);
        let (recycle, spare) = channel();
        let skipped: Skipped = Arc::default();
        let sk = Arc::clone(&skipped);
        let thread = std::thread::spawn(move || {
            let mut w = TarWriter {
                out: Out {
                    tx: tx.clone(),
                    spare,
                    buf: vec![0; CHUNK],
                    fill: 0,
                },
                pax: Vec::new(),
            };
            let res = job(&mut w, &sk).and_then(|()| w.finish());
            match res {
                Ok(()) => {
                    let _ = tx.send(Msg::End);
                }
                Err(e) => {
                    // A send error means the reader is gone: nobody to tell.
                    let _ = tx.send(Msg::Failed(e));
                }
            }
        });
        TarStream {
            rx: Some(rx),
            recycle,
            cur: Vec::new(),
            pos: 0,
            finished: false,
            failed: None,
            skipped,
            thread: Some(thread),
        }
    }
}

impl Read for TarStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos < self.cur.len() {
                let n = buf.len().min(self.cur.len() - self.pos);
                buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if let Some(msg) = &self.failed {
                return Err(io::Error::other(msg.clone()));
            }
            if self.finished {
                return Ok(0);
            }
            let Some(rx) = &self.rx else {
                return Ok(0);
            };
            match rx.recv() {
                Ok(Msg::Data(d)) => {
                    let used = std::mem::replace(&mut self.cur, d);
                    self.pos = 0;
                    if used.capacity() == CHUNK {
                        // The producer may be gone already: then the buffer is just freed.
                        let _ = self.recycle.send(used);
                    }
                }
                Ok(Msg::End) => self.finished = true,
                Ok(Msg::Failed(e)) => {
                    self.failed = Some(e.to_string());
                    return Err(io::Error::other(e));
                }
                Err(_) => {
                    let msg = "layer tar producer ended without finishing the archive".to_string();
                    self.failed = Some(msg.clone());
                    return Err(io::Error::other(msg));
                }
            }
        }
    }
}

impl Drop for TarStream {
    fn drop(&mut self) {
        // Closing the receiver makes the producer's next send fail, which ends it.
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The producer's output buffer: filled in place, sent to the reader when full.
pub(crate) struct Out {
    pub(crate) tx: SyncSender<Msg>,
    /// Buffers the reader is done with.
    pub(crate) spare: Receiver<Vec<u8>>,
    /// Always `CHUNK` bytes long; `buf[..fill]` is pending output.
    pub(crate) buf: Vec<u8>,
    pub(crate) fill: usize,
}

impl Out {
    pub(crate) fn send(&mut self) -> io::Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        let mut next = self.spare.try_recv().unwrap_or_default();
        next.resize(CHUNK, 0);
        let mut chunk = std::mem::replace(&mut self.buf, next);
        chunk.truncate(self.fill);
        self.fill = 0;
        self.tx
            .send(Msg::Data(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the tar reader went away"))
    }

    /// Room for at least one byte, sending the buffer when it is full.
    pub(crate) fn room(&mut self) -> io::Result<usize> {
        if self.fill == CHUNK {
            self.send()?;
        }
        Ok(CHUNK - self.fill)
    }

    pub(crate) fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.room()?.min(data.len());
            self.buf[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
        }
        Ok(())
    }

    pub(crate) fn zeros(&mut self, mut n: usize) -> io::Result<()> {
        while n > 0 {
            let k = self.room()?.min(n);
            self.buf[self.fill..self.fill + k].fill(0);
            self.fill += k;
            n -= k;
        }
        Ok(())
    }

    /// Reads exactly `size` bytes of `fd` into the output: at its current offset, or with
    /// `pread(2)` from `offset`.
    pub(crate) fn copy_from(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: Option<u64>,
        size: u64,
        path: &Path,
    ) -> Result<()> {
        let mut left = size;
        while left > 0 {
            let room = self
                .room()
                .map_err(|e| werr(path.as_os_str().as_bytes(), e))?;
            let want = (left.min(room as u64)) as usize;
            let dst = &mut self.buf[self.fill..self.fill + want];
            let got = match offset {
                Some(off) => rustix::io::pread(fd, dst, off + (size - left)),
                None => rustix::io::read(fd, dst),
            };
            let n = match got {
                Ok(0) => {
                    return Err(Error::io(
                        "read",
                        path,
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "file shrank while being exported: expected {size} bytes, found {}",
                                size - left
                            ),
                        ),
                    ));
                }
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::io("read", path, e.into())),
            };
            self.fill += n;
            left -= n as u64;
        }
        Ok(())
    }
}
