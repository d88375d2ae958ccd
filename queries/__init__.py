"""Named SQL queries (`*.sql` here) and the helpers that turn query rows into tensors."""
