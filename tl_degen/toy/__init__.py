"""Small models the package ships for tests, examples and the demo."""
