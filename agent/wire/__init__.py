"""The v1 wire contract, both directions: topics, the messages of device and operator (state,
health, commands, desired and deploy states, manifests and signing, chunk frames). Imports no
MQTT client: the device and jetfleet both build and check their messages here."""
