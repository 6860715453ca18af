"""Post-call work: extract fields from an ended session's transcript and deliver them."""
