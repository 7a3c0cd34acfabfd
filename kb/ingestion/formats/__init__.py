"""One parser per supported format: `parse_<format>(name, data, limits) -> ParsedDocument`."""
