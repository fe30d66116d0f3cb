"""Learning from user feedback: an append-only log of corrections, applied as edits once each."""
