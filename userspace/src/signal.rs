//! Process signals: SIGTERM (what `docker stop` sends) and SIGINT both mean "stop".

use std::future::Future;

/// Watches SIGTERM and SIGINT from this call on, and resolves on the first of them. The
/// handlers are installed here, not when the future is first polled: a process that says it
/// is ready (`listening on udp …`) and is then stopped at once must stop in order, not die of
/// the signal's default action. Must be called inside a Tokio runtime.
pub fn terminate() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Ok(mut term), Err(e)) => {
                    tracing::warn!(error = %e, "cannot watch SIGINT; only SIGTERM stops the process");
                    let _ = term.recv().await;
                }
                (Err(e), _) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the process");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
