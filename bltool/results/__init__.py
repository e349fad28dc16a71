"""Results: collecting runs into report rows, and the report's figures."""
