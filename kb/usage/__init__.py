"""The usage ledger and what reads it: reports, charts, the usage dashboard's views and URLs."""
