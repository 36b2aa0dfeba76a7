"""Boot timeline: typed trace events (events), what known firmware and kernel lines mean
(phases), trace files (files) and their rendering (render)."""
