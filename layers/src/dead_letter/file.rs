//! An append-only JSON-lines dead-letter file.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::task::JoinHandle;
use tower::Service;
use watchtower::codec::structured;
use watchtower::ext;
use watchtower::{Error, ErrorKind, Event};

/// A dead-letter service that appends each event to a file as one line of
/// CloudEvents JSON (`application/cloudevents+json`), so any tool can read
/// it and [`read`](Self::read) plus [`redrive`](super::redrive) can
/// replay it.
///
/// Each line is written with one `write` call on a file opened in append
/// mode, so lines from concurrent callers do not interleave. The write
/// runs on tokio's blocking pool; with [`sync`](Self::sync) each line is
/// also flushed to disk before the call succeeds. The original topic is in
/// the `deadlettertopic` extension (topics are not part of the format).
///
/// ```
/// use watchtower::{Event, PublishExt};
/// use watchtower_layers::dead_letter::FileDeadLetters;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let path = std::env::temp_dir().join(format!("dlq-doc-{}.jsonl", std::process::id()));
/// let mut dlq = FileDeadLetters::open(&path)?;
/// dlq.publish(Event::new("order.failed", serde_json::json!({"id": 7}))).await?;
/// let contents = FileDeadLetters::read(&path)?;
/// assert_eq!(contents.events[0].ty(), "order.failed");
/// assert!(contents.bad_lines.is_empty());
/// # std::fs::remove_file(&path).ok();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct FileDeadLetters {
    file: Arc<File>,
    path: Arc<Path>,
    sync: bool,
}

impl FileDeadLetters {
    /// Opens (creating if needed) `path` for appending.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the file cannot be opened.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("cannot open dead-letter file {}: {e}", path.display()),
                )
            })?;
        Ok(FileDeadLetters {
            file: Arc::new(file),
            path: path.into(),
            sync: false,
        })
    }

    /// Flushes every line to disk (`fsync`) before answering. Default: off;
    /// the line is in the OS's cache, which survives a process crash but
    /// not a power loss.
    pub fn sync(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads a dead-letter file back: the events, with their topic restored
    /// from `deadlettertopic`, and the lines that did not decode (1-based
    /// line number and error) so that nothing is skipped silently.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the file cannot be read.
    pub fn read(path: impl AsRef<Path>) -> Result<FileContents, Error> {
        let path = path.as_ref();
        let content = std::fs::read(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot read dead-letter file {}: {e}", path.display()),
            )
        })?;
        let mut events = Vec::new();
        let mut bad = Vec::new();
        for (i, line) in content.split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match structured::from_slice(line) {
                Ok(mut event) => {
                    if let Some(topic) = event.extension(ext::DEAD_LETTER_TOPIC).map(str::to_owned) {
                        event.set_topic(topic);
                    }
                    events.push(event);
                }
                Err(e) => bad.push((i + 1, e)),
            }
        }
        Ok(FileContents {
            events,
            bad_lines: bad,
        })
    }
}

/// What [`FileDeadLetters::read`] found.
#[derive(Debug, Default)]
pub struct FileContents {
    /// The events, oldest first, topics restored.
    pub events: Vec<Event>,
    /// Lines that did not decode: 1-based line number and why.
    pub bad_lines: Vec<(usize, Error)>,
}

impl fmt::Debug for FileDeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileDeadLetters")
            .field("path", &self.path)
            .field("sync", &self.sync)
            .finish()
    }
}

/// Response future of [`FileDeadLetters`].
#[derive(Debug)]
pub struct WriteFuture {
    state: WriteState,
}

#[derive(Debug)]
enum WriteState {
    Writing(JoinHandle<std::io::Result<()>>, Option<Event>),
    Failed(Option<Error>),
}

impl Future for WriteFuture {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            WriteState::Failed(e) => Poll::Ready(Err(e
                .take()
                .unwrap_or_else(|| Error::new(ErrorKind::Other, "polled after completion")))),
            WriteState::Writing(handle, event) => {
                let result = std::task::ready!(Pin::new(handle).poll(cx));
                let err = match result {
                    Ok(Ok(())) => return Poll::Ready(Ok(())),
                    Ok(Err(io)) => {
                        Error::new(ErrorKind::Other, format!("dead-letter file write failed: {io}"))
                    }
                    Err(join) => Error::new(
                        ErrorKind::Other,
                        format!("dead-letter file writer failed: {join}"),
                    ),
                };
                let err = match event.take() {
                    Some(e) => err.with_event(e),
                    None => err,
                };
                Poll::Ready(Err(err))
            }
        }
    }
}

impl Service<Event> for FileDeadLetters {
    type Response = ();
    type Error = Error;
    type Future = WriteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let mut line = match structured::to_vec(&event) {
            Ok(line) => line,
            Err(e) => {
                return WriteFuture {
                    state: WriteState::Failed(Some(e.with_event(event))),
                };
            }
        };
        line.push(b'\n');
        let file = self.file.clone();
        let sync = self.sync;
        let handle = tokio::task::spawn_blocking(move || {
            (&*file).write_all(&line)?;
            if sync { file.sync_data() } else { Ok(()) }
        });
        WriteFuture {
            state: WriteState::Writing(handle, Some(event)),
        }
    }
}
