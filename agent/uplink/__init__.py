"""The device's uplink to the fleet: the MQTT 5 link, the on-disk outbox, the session that sends
state and health reports, system telemetry, and the command router."""
