"""Accuracy on public benchmark formats (DocVQA, InfoVQA, ChartQA, AI2D, Video-MME) against any
OpenAI-compatible endpoint: dataset readers (`formats`), each benchmark's own metric (`metrics`) and a
concurrent client (`runner`). `nemovl eval --dataset FILE --format NAME` drives them."""
