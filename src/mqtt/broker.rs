//! The embedded MQTT broker (`rumqttd`) for the zero-install demo: loopback only, no
//! persistence. Production configurations point at a real broker and leave this off.

use std::net::SocketAddr;

use super::MqttError;

/// A message the embedded broker forwarded to the watcher.
#[derive(Debug, Clone, PartialEq)]
pub struct Forwarded {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// The running embedded broker: receives what is published on the watched topics.
pub struct EmbeddedBroker {
    link: rumqttd::local::LinkRx,
}

impl EmbeddedBroker {
    /// Blocks until the next forwarded message; `None` once the broker has stopped.
    pub fn recv(&mut self) -> Option<Forwarded> {
        loop {
            match self.link.recv() {
                Ok(Some(rumqttd::Notification::Forward(forward))) => {
                    let topic = String::from_utf8_lossy(&forward.publish.topic).into_owned();
                    return Some(Forwarded { topic, payload: forward.publish.payload.to_vec() });
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// Starts `rumqttd` on `addr` (MQTT 3.1.1 and 5 on the same port is not supported by rumqttd, so
/// `v5` picks which one) in its own thread; the returned handle receives every message published
/// on `watch` (a topic filter), for printing.
pub fn start(addr: SocketAddr, v5: bool, watch: &str) -> Result<EmbeddedBroker, MqttError> {
    let err = |message: String| MqttError::Broker { addr, message };
    if !addr.ip().is_loopback() {
        return Err(err("the embedded broker listens on loopback only".into()));
    }
    // The listener section is named "v4" or "v5" after the protocol it speaks.
    let config = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 64
max_outgoing_packet_count = 200
max_segment_size = 10485760
max_segment_count = 10

[{proto}.1]
name = "scenecast-embedded"
listen = "{addr}"
next_connection_delay_ms = 1
    [{proto}.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 16777216
    max_inflight_count = 100
    dynamic_filters = true
"#,
        proto = if v5 { "v5" } else { "v4" },
    );
    let config: rumqttd::Config = toml::from_str(&config).map_err(|e| err(e.to_string()))?;
    // Fail early and clearly when the port is taken (rumqttd would only log it).
    std::net::TcpListener::bind(addr).map_err(|e| err(format!("cannot listen: {e}")))?;
    let mut broker = rumqttd::Broker::new(config);
    let (mut link_tx, link_rx) = broker.link("scenecast-printer").map_err(|e| err(e.to_string()))?;
    link_tx.subscribe(watch).map_err(|e| err(e.to_string()))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let _link_tx = link_tx;
            if let Err(e) = broker.start() {
                tracing::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .map_err(|e| err(e.to_string()))?;
    Ok(EmbeddedBroker { link: link_rx })
}
