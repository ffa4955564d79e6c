"""How good the result is: perplexity, sparsity and N:M checks."""
