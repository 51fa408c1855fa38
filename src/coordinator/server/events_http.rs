//! `GET /client/v1/events`: the event outbox, live, as server-sent events
//! (read role). Each event is `id: N`, `event: KIND`, `data: JSON` (the
//! JSON hooks get); a `Last-Event-ID` header (what browsers' `EventSource`
//! sends when it reconnects) or `?after=N` resumes after event N, as long
//! as the outbox still holds what follows it (the last 10,000 events at
//! least); without either, the stream starts with the next event. A
//! comment line every 15 s keeps proxies from closing an idle stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream};
use serde::Deserialize;

use super::{blocking, ApiError, App, ReadToken};
use crate::coordinator::model::Event;

/// Events read from the datastore at a time.
const BATCH: usize = 500;
/// How often a stream looks at the outbox when nothing wakes it.
const POLL: Duration = Duration::from_secs(1);

pub(super) fn router() -> Router<App> {
    Router::new().route("/client/v1/events", get(events))
}

#[derive(Debug, Deserialize)]
struct After {
    after: Option<i64>,
}

/// Where a stream starts: after `Last-Event-ID`, else `?after=`, else
/// after the last event written.
fn start_after(headers: &HeaderMap, query: &After) -> Result<Option<i64>, ApiError> {
    if let Some(v) = headers.get("last-event-id") {
        let text = v
            .to_str()
            .map_err(|_| ApiError::bad_request("Last-Event-ID: not text"))?;
        let n = text.trim().parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("Last-Event-ID: '{text}' is not an event id"))
        })?;
        return Ok(Some(n));
    }
    Ok(query.after)
}

async fn events(
    State(app): State<App>,
    _: ReadToken,
    headers: HeaderMap,
    Query(query): Query<After>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let after = match start_after(&headers, &query)? {
        Some(n) => n,
        None => blocking(&app, |a| Ok(a.ds.last_event_id()?)).await?,
    };
    let state = Reader {
        wake: app.wake.subscribe(),
        app,
        cursor: after,
        buffer: VecDeque::new(),
    };
    let stream = stream::unfold(state, |mut r| async move {
        let e = r.next().await;
        Some((Ok(sse_event(&e)), r))
    });
    Ok(Sse::new(stream).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    ))
}

fn sse_event(e: &Event) -> SseEvent {
    SseEvent::default()
        .id(e.id.to_string())
        .event(e.kind.as_str())
        .data(e.to_json().to_string())
}

/// One client's place in the outbox.
struct Reader {
    app: App,
    wake: tokio::sync::watch::Receiver<u64>,
    cursor: i64,
    buffer: VecDeque<Event>,
}

impl Reader {
    /// The next event, waiting for it as long as it takes.
    async fn next(&mut self) -> Event {
        loop {
            if let Some(e) = self.buffer.pop_front() {
                self.cursor = e.id;
                return e;
            }
            // Marked seen before reading, so a write during the read wakes
            // the next wait instead of being missed.
            self.wake.borrow_and_update();
            let cursor = self.cursor;
            match blocking(&self.app, move |a| Ok(a.ds.events_after(cursor, BATCH)?)).await {
                Ok(events) if !events.is_empty() => {
                    self.buffer.extend(events);
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::error!("event stream: {}", e.message),
            }
            let _ = tokio::time::timeout(POLL, self.wake.changed()).await;
        }
    }
}
