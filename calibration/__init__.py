"""Where activations come from: corpora, token windows, block-input capture and statistic accumulators."""
