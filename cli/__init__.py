"""The `npgpt` command line: thin click commands, one module per topic, each calling the library."""
