"""capture stage of twinstudio."""
