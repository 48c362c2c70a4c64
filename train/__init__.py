"""train stage of twinstudio."""
