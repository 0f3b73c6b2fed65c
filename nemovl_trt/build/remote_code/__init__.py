"""Files the build copies into LLM bundles (not imported by nemovl_trt itself)."""
