//! Extended-protocol messages held until Sync (or Flush), because the
//! messages up to a Sync form one implicit transaction on the server and
//! must run on one backend.
//!
//! Each frame is inspected once, when it arrives: its statement name and,
//! for a Parse, the class of its SQL are kept as offsets and values next to
//! it, so dispatching the batch never parses or validates it again.

use pgsplit_protocol::frontend::{self, Bind, Object, Parse};
use pgsplit_protocol::{tag, Frame, ProtoError};
use pgsplit_router::route;
use pgsplit_router::Class;

/// What the session needs to know about one held frame.
#[derive(Debug, Clone, Copy)]
pub(super) enum Meta {
    /// Parse: the name is `body[..name_end]`, the SQL `body[sql.0..sql.1]`.
    Parse {
        name_end: usize,
        sql: (usize, usize),
        class: Class,
    },
    /// Bind or Describe of a statement named `body[start..end]`.
    Uses {
        start: usize,
        end: usize,
    },
    /// Close of the statement named `body[start..end]`.
    CloseStatement {
        start: usize,
        end: usize,
    },
    /// Close of a portal (its CloseComplete is relayed as is).
    ClosePortal,
    Other,
}

/// Text at `body[start..end]`, already checked as UTF-8 on arrival.
pub(super) fn text(f: &Frame, start: usize, end: usize) -> &str {
    body_text(f.body(), start, end)
}

/// [`text`] of a message body.
pub(super) fn body_text(body: &[u8], start: usize, end: usize) -> &str {
    std::str::from_utf8(&body[start..end]).unwrap_or_default()
}

/// Checks the body of a message with tag `tag` and says where its names
/// and SQL are. A Parse's class is left as `unclassified`, for the caller.
/// Also returns the text the caller looks at: a Parse's SQL, the name of
/// the statement a Bind, Describe or Close names, else "".
///
/// # Errors
/// `Malformed`/`Utf8` for a message that is not well formed.
pub(super) fn locate(
    tag: u8,
    body: &[u8],
    unclassified: Class,
) -> Result<(Meta, &str), ProtoError> {
    use tag::frontend as t;
    Ok(match tag {
        t::PARSE => {
            let p = Parse::parse(body)?;
            let name_end = p.name.len();
            let meta = Meta::Parse {
                name_end,
                sql: (name_end + 1, name_end + 1 + p.sql.len()),
                class: unclassified,
            };
            (meta, p.sql)
        }
        t::BIND => {
            let b = Bind::parse(body)?;
            let start = b.portal.len() + 1;
            let meta = Meta::Uses {
                start,
                end: start + b.statement.len(),
            };
            (meta, b.statement)
        }
        t::DESCRIBE => match frontend::object(body, "Describe")? {
            Object::Statement(name) => (
                Meta::Uses {
                    start: 1,
                    end: 1 + name.len(),
                },
                name,
            ),
            Object::Portal(_) => (Meta::Other, ""),
        },
        t::CLOSE => match frontend::object(body, "Close")? {
            Object::Statement(name) => (
                Meta::CloseStatement {
                    start: 1,
                    end: 1 + name.len(),
                },
                name,
            ),
            Object::Portal(_) => (Meta::ClosePortal, ""),
        },
        t::EXECUTE => {
            frontend::execute(body)?;
            (Meta::Other, "")
        }
        _ => (Meta::Other, ""),
    })
}

#[derive(Default)]
pub(super) struct Batch {
    pub frames: Vec<Frame>,
    pub meta: Vec<Meta>,
    pub bytes: usize,
    /// Combined class of the statements it parses or binds.
    pub class: Option<Class>,
    /// It parses a `pgsplit.*` statement (answered by the proxy).
    pub local: bool,
}

impl Batch {
    pub fn clear(&mut self) {
        self.frames.clear();
        self.meta.clear();
        self.bytes = 0;
        self.class = None;
        self.local = false;
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn push(&mut self, f: Frame, meta: Meta) {
        self.bytes += f.len();
        self.frames.push(f);
        self.meta.push(meta);
    }

    /// Class of statement `name` if this batch parses it (the last Parse
    /// of that name so far).
    pub fn local_class(&self, name: &str) -> Option<Class> {
        self.frames
            .iter()
            .zip(&self.meta)
            .rev()
            .find_map(|(f, m)| match m {
                Meta::Parse {
                    name_end, class, ..
                } if text(f, 0, *name_end) == name => Some(*class),
                _ => None,
            })
    }

    pub fn add_class(&mut self, c: Class) {
        self.class = Some(match self.class {
            None => c,
            Some(prev) => route::combine(&prev, &c),
        });
    }
}
