//! Documents shared by the unit tests.

/// Every field of the v1 document, valid.
pub(crate) const FULL_YAML: &str = r#"
apiVersion: cellhost.dev/v1
kind: Cell
metadata: { name: hello, labels: { team: a } }
spec:
  isolation: process          # process | container | vm | microvm
  image: host
  command: ["/bin/echo", "hello"]
  workingDir: /tmp
  env: { GREETING: hi, OTHER: "2" }
  secrets:
    - { name: api_token, from: { file: ./token } }
    - { name: db, from: { env: DB_PASSWORD } }
    - { name: inline, from: { value: s3cret } }
  resources: { cpus: 0.5, memoryMiB: 128, pids: 64, diskGiB: 1 }
  ports: [ { container: 8080, host: 18080, protocol: tcp } ]
  volume: { path: /data, sizeGiB: 1, encrypted: true }
  network:
    mode: bridged
    egress: [ { cidr: 10.0.0.0/8, port: 443, protocol: tcp } ]
    dns: [ 10.0.0.53 ]
    egressBytesPerSecond: 1048576
  lifetime: { ttlSeconds: 3600 }
"#;
