"""The plan: what a study is (cells, budgets, grid files). Imports the core (``trainables``) only."""
