//! The connection: `rumqttc`'s v5 and v3.1.1 clients behind one small enum, and the options
//! (session, last will, TLS) they connect with. The only file that knows `rumqttc`.

use std::time::Duration;

use super::settings::{MqttConfig, MqttProtocol};
use super::spool::SpooledMessage;
use super::wire::Topics;
use super::MqttError;

/// A connection-level event, the same for both protocol versions.
pub(super) enum Event {
    Connected,
    SubAck,
    Publish {
        topic: String,
        payload: Vec<u8>,
        response_topic: Option<String>,
        correlation: Option<Vec<u8>>,
        expiry_s: Option<u32>,
    },
    Disconnected,
    Other,
}

#[derive(Clone)]
pub(super) enum Client {
    V5(rumqttc::v5::AsyncClient),
    V3(rumqttc::AsyncClient),
}

pub(super) enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    V3(Box<rumqttc::EventLoop>),
}

impl Client {
    pub(super) async fn publish(&self, m: &SpooledMessage) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    correlation_data: m.correlation.clone().map(Into::into),
                    user_properties: m.user_properties.clone(),
                    content_type: m.content_type.clone(),
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
            EventLoop::V5(l) => {
                use rumqttc::v5::mqttbytes::v5::Packet;
                use rumqttc::v5::Event as E;
                match l.poll().await.map_err(|e| e.to_string())? {
                    E::Incoming(Packet::ConnAck(_)) => Ok(Event::Connected),
                    E::Incoming(Packet::SubAck(_)) => Ok(Event::SubAck),
                    E::Incoming(Packet::Publish(p)) => {
                        let props = p.properties.unwrap_or_default();
                        Ok(Event::Publish {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            response_topic: props.response_topic,
                            correlation: props.correlation_data.map(|b| b.to_vec()),
                            expiry_s: props.message_expiry_interval,
                        })
                    }
                    E::Incoming(Packet::Disconnect(_)) | E::Outgoing(rumqttc::Outgoing::Disconnect) => {
                        Ok(Event::Disconnected)
                    }
                    _ => Ok(Event::Other),
                }
            }
            EventLoop::V3(l) => {
                use rumqttc::{Event as E, Packet};
                match l.poll().await.map_err(|e| e.to_string())? {
                    E::Incoming(Packet::ConnAck(_)) => Ok(Event::Connected),
                    E::Incoming(Packet::SubAck(_)) => Ok(Event::SubAck),
                    E::Incoming(Packet::Publish(p)) => Ok(Event::Publish {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        response_topic: None,
                        correlation: None,
                        expiry_s: None,
                    }),
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

pub(super) fn connect(config: &MqttConfig, topics: &Topics) -> Result<(Client, EventLoop), MqttError> {
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
    let client_id = config.client_id();
    Ok(match config.protocol {
        MqttProtocol::V5 => {
            use rumqttc::v5::mqttbytes::v5::LastWill;
            let mut options = rumqttc::v5::MqttOptions::new(client_id, &config.host, config.port);
            options.set_keep_alive(keep_alive);
            // A persistent session: the broker keeps our subscriptions and QoS 1 messages for an hour.
            options.set_clean_start(false);
            options.set_session_expiry_interval(Some(3600));
            options.set_last_will(LastWill::new(
                topics.status(),
                "offline",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                None,
            ));
            options.set_max_packet_size(Some(1 << 24));
            if let (Some(u), Some(p)) = (&config.username, &config.password) {
                options.set_credentials(u, p);
            }
            if let Some(tls) = tls {
                options.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
        }
        MqttProtocol::V311 => {
            let mut options = rumqttc::MqttOptions::new(client_id, &config.host, config.port);
            options.set_keep_alive(keep_alive);
            options.set_clean_session(false);
            options.set_last_will(rumqttc::LastWill::new(topics.status(), "offline", rumqttc::QoS::AtLeastOnce, true));
            options.set_max_packet_size(1 << 24, 1 << 24);
            if let (Some(u), Some(p)) = (&config.username, &config.password) {
                options.set_credentials(u, p);
            }
            if let Some(tls) = tls {
                options.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(options, 64);
            (Client::V3(client), EventLoop::V3(Box::new(eventloop)))
        }
    })
}
