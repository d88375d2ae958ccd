"""The paper's analysis stages over a store: SQL and tensors in, intervention specs and tables out."""
