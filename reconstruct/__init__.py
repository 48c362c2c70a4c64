"""reconstruct stage of twinstudio."""
