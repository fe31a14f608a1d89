//! The connection: `rumqttc`'s v5 and v3.1.1 clients behind one small enum, and the options
//! (session, last will, TLS) they connect with. The only file that knows `rumqttc`.

use std::time::Duration;

use super::settings::{MqttConfig, MqttProtocol};
use super::spool::SpooledMessage;
use super::MqttError;

/// A received message, the same for both protocol versions.
#[derive(Debug)]
pub(super) struct Incoming {
    pub(super) topic: String,
    pub(super) payload: Vec<u8>,
    pub(super) response_topic: Option<String>,
    pub(super) correlation: Option<Vec<u8>>,
    pub(super) expiry_s: Option<u32>,
    pub(super) user_properties: Vec<(String, String)>,
    pub(super) content_type: Option<String>,
    /// With manual acknowledgement: what [`Client::ack`] needs to acknowledge this message.
    pub(super) ack: Option<AckToken>,
}

/// A connection-level event, the same for both protocol versions.
pub(super) enum Event {
    Connected,
    SubAck,
    Publish(Box<Incoming>),
    Disconnected,
    Other,
}

/// Acknowledges a QoS 1 message received with manual acknowledgement (the packet id; the
/// payload is not kept).
#[derive(Debug, Clone, PartialEq)]
pub struct AckToken(AckPacket);

impl AckToken {
    /// A token for packet id `pkid`, for tests of what carries an acknowledgement.
    #[cfg(test)]
    pub(super) fn for_test(pkid: u16) -> Self {
        AckToken(AckPacket::V3 { pkid, qos1: true })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum AckPacket {
    V5(Box<rumqttc::v5::mqttbytes::v5::Publish>),
    V3 { pkid: u16, qos1: bool },
}

/// How a connection presents itself to the broker.
pub(super) struct Session {
    pub(super) client_id: String,
    /// Keep the session (subscriptions, unacknowledged QoS 1 messages) this many seconds after a
    /// disconnect, and resume it on reconnect; 0: start clean.
    pub(super) expiry_s: u32,
    /// Publish a retained `offline` here when the connection drops without a clean disconnect.
    pub(super) will: Option<String>,
    /// Acknowledge received messages only through [`Client::ack`].
    pub(super) manual_acks: bool,
    /// At most this many unacknowledged QoS 1 messages in flight to us (MQTT v5 Receive Maximum).
    pub(super) receive_maximum: Option<u16>,
}

#[derive(Clone)]
pub(super) enum Client {
    V5(rumqttc::v5::AsyncClient),
    V3(rumqttc::AsyncClient),
}

pub(super) enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>, bool),
    V3(Box<rumqttc::EventLoop>, bool),
}

impl Client {
    pub(super) async fn publish(&self, m: &SpooledMessage) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    correlation_data: m.correlation.clone().map(Into::into),
                    user_properties: m.user_properties.clone(),
                    content_type: m.content_type.clone(),
                    response_topic: m.response_topic.clone(),
                    message_expiry_interval: m.expiry_s,
                    ..Default::default()
                };
                c.publish_with_properties(
                    m.topic.clone(),
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    m.retain,
                    m.payload.clone(),
                    props,
                )
                .await
                .map_err(|e| e.to_string())
            }
            Client::V3(c) => c
                .publish(m.topic.clone(), rumqttc::QoS::AtLeastOnce, m.retain, m.payload.clone())
                .await
                .map_err(|e| e.to_string()),
        }
    }

    pub(super) async fn subscribe(&self, topic: &str) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                c.subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.map_err(|e| e.to_string())
            }
            Client::V3(c) => c.subscribe(topic, rumqttc::QoS::AtLeastOnce).await.map_err(|e| e.to_string()),
        }
    }

    /// Acknowledges a message received with manual acknowledgement.
    pub(super) async fn ack(&self, token: &AckToken) -> Result<(), String> {
        match (self, &token.0) {
            (Client::V5(c), AckPacket::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            (Client::V3(c), AckPacket::V3 { pkid, qos1 }) => {
                let mut p = rumqttc::Publish::new("", rumqttc::QoS::AtMostOnce, Vec::new());
                p.pkid = *pkid;
                p.qos = if *qos1 { rumqttc::QoS::AtLeastOnce } else { rumqttc::QoS::AtMostOnce };
                c.ack(&p).await.map_err(|e| e.to_string())
            }
            _ => Err("an acknowledgement for the other protocol version".into()),
        }
    }

    pub(super) async fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V3(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

impl EventLoop {
    pub(super) async fn poll(&mut self) -> Result<Event, String> {
        match self {
            EventLoop::V5(l, manual_acks) => {
                let self_acks = *manual_acks;
                use rumqttc::v5::mqttbytes::v5::Packet;
                use rumqttc::v5::Event as E;
                match l.poll().await.map_err(|e| e.to_string())? {
                    E::Incoming(Packet::ConnAck(_)) => Ok(Event::Connected),
                    E::Incoming(Packet::SubAck(_)) => Ok(Event::SubAck),
                    E::Incoming(Packet::Publish(mut p)) => {
                        let props = p.properties.take().unwrap_or_default();
                        let payload = std::mem::take(&mut p.payload).to_vec();
                        Ok(Event::Publish(Box::new(Incoming {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload,
                            response_topic: props.response_topic,
                            correlation: props.correlation_data.map(|b| b.to_vec()),
                            expiry_s: props.message_expiry_interval,
                            user_properties: props.user_properties,
                            content_type: props.content_type,
                            ack: self_acks.then(|| AckToken(AckPacket::V5(Box::new(p)))),
                        })))
                    }
                    E::Incoming(Packet::Disconnect(_)) | E::Outgoing(rumqttc::Outgoing::Disconnect) => {
                        Ok(Event::Disconnected)
                    }
                    _ => Ok(Event::Other),
                }
            }
            EventLoop::V3(l, manual_acks) => {
                let self_acks = *manual_acks;
                use rumqttc::{Event as E, Packet};
                match l.poll().await.map_err(|e| e.to_string())? {
                    E::Incoming(Packet::ConnAck(_)) => Ok(Event::Connected),
                    E::Incoming(Packet::SubAck(_)) => Ok(Event::SubAck),
                    E::Incoming(Packet::Publish(p)) => Ok(Event::Publish(Box::new(Incoming {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        response_topic: None,
                        correlation: None,
                        expiry_s: None,
                        user_properties: Vec::new(),
                        content_type: None,
                        ack: self_acks.then_some(AckToken(AckPacket::V3 {
                            pkid: p.pkid,
                            qos1: p.qos == rumqttc::QoS::AtLeastOnce,
                        })),
                    }))),
                    E::Incoming(Packet::Disconnect) | E::Outgoing(rumqttc::Outgoing::Disconnect) => {
                        Ok(Event::Disconnected)
                    }
                    _ => Ok(Event::Other),
                }
            }
        }
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::TlsFile { path: path.to_owned(), source })
}

pub(super) fn connect(config: &MqttConfig, session: &Session) -> Result<(Client, EventLoop), MqttError> {
    let tls = match &config.tls {
        Some(tls) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client_auth = match (&tls.client_cert, &tls.client_key) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                _ => None,
            };
            Some(rumqttc::TlsConfiguration::Simple { ca: read(&tls.ca_file)?, alpn: None, client_auth })
        }
        None => None,
    };
    let keep_alive = Duration::from_secs(config.keep_alive_s);
    let client_id = session.client_id.clone();
    Ok(match config.protocol {
        MqttProtocol::V5 => {
            use rumqttc::v5::mqttbytes::v5::LastWill;
            let mut options = rumqttc::v5::MqttOptions::new(client_id, &config.host, config.port);
            options.set_keep_alive(keep_alive);
            options.set_clean_start(session.expiry_s == 0);
            if session.expiry_s > 0 {
                options.set_session_expiry_interval(Some(session.expiry_s));
            }
            if let Some(will) = &session.will {
                options.set_last_will(LastWill::new(
                    will,
                    "offline",
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    true,
                    None,
                ));
            }
            options.set_max_packet_size(Some(1 << 24));
            options.set_manual_acks(session.manual_acks);
            if session.receive_maximum.is_some() {
                options.set_receive_maximum(session.receive_maximum);
            }
            if let (Some(u), Some(p)) = (&config.username, &config.password) {
                options.set_credentials(u, p);
            }
            if let Some(tls) = tls {
                options.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop), session.manual_acks))
        }
        MqttProtocol::V311 => {
            let mut options = rumqttc::MqttOptions::new(client_id, &config.host, config.port);
            options.set_keep_alive(keep_alive);
            // v3.1.1 has no session expiry: a session is kept until the client starts clean.
            options.set_clean_session(session.expiry_s == 0);
            if let Some(will) = &session.will {
                options.set_last_will(rumqttc::LastWill::new(will, "offline", rumqttc::QoS::AtLeastOnce, true));
            }
            options.set_max_packet_size(1 << 24, 1 << 24);
            options.set_manual_acks(session.manual_acks);
            if let (Some(u), Some(p)) = (&config.username, &config.password) {
                options.set_credentials(u, p);
            }
            if let Some(tls) = tls {
                options.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(options, 64);
            (Client::V3(client), EventLoop::V3(Box::new(eventloop), session.manual_acks))
        }
    })
}
