'use strict'
// An offline-mode Minecraft Bedrock Edition client (npm bedrock-protocol) for discoproxy's
// UDP integration tests: `node bedrock_client.js <host> <port> <username> <version>`. It
// connects over RakNet/UDP, prints JSON lines on stdout and exits:
//   {"event":"join"}                      RakNet + login + encryption handshake done
//   {"event":"spawn"}                     the server let it spawn (play_status player_spawn)
//   {"event":"disconnect","reason":"…"}   the server kicked it (or refused its version)
//   {"event":"end","reason":"…"}          the connection ended (exit 0)
//   {"event":"error","message":"…"}
//   {"event":"timeout","stage":"…"}       nothing finished within TIMEOUT_MS (exit 2)
// After "spawn" it disconnects by itself ("test done"). bedrock_server.js is its peer.
//
// Options that matter (bedrock-protocol 3.59):
// - raknetBackend: 'jsp-raknet', the pure-JS RakNet (the default, 'raknet-native', is a C++
//   addon that package.json does not let npm build; see bedrock_server.js). The deprecated
//   spelling of the same is useNativeRaknet: false.
// - skipPing: true. Without it createClient first pings through raknet-native whatever the
//   backend, and then follows the port the server advertises (followPort), which through a
//   proxy would be the backend's own port, not the proxy's.
// - conLog: null, or the library prints plain-text lines on stdout among the JSON ones.
// - the RakNet connection runs in a worker thread (useRaknetWorkers, the default).
// Timing: jsp-raknet's client sends OpenConnectionRequest1 (padded to its MTU, 1400 bytes
// of UDP payload) and then sleeps a fixed 1.5 s before it handles the reply, so "join"
// comes about 1.7 s after the connect and 2.3-2.6 s after `node` starts (requiring the
// library and building the version's serializer take the rest); "spawn" follows within
// 0.1 s. A lost request costs another 1.5 s (it retries 5 times, 100 bytes smaller each
// time, then gives up), hence TIMEOUT_MS.
const TIMEOUT_MS = 15000
const [host, port, username, version] = process.argv.slice(2)
const emit = (event, fields) => console.log(JSON.stringify({ event, ...fields }))

function loadBedrock () {
  // bedrock-protocol's index requires raknet-native eagerly; tolerate it being unbuilt.
  const Module = require('module')
  const load = Module._load
  Module._load = function (request, ...rest) {
    if (request !== 'raknet-native') return load.call(this, request, ...rest)
    try {
      return load.call(this, request, ...rest)
    } catch {
      return {}
    }
  }
  try {
    return require('bedrock-protocol')
  } finally {
    Module._load = load
  }
}

if (!host || !port || !username || !version) {
  console.error('usage: node bedrock_client.js <host> <port> <username> <version>')
  process.exit(64)
}

const { createClient } = loadBedrock()
let stage = 'connecting'
let finished = false
const finish = (reason) => {
  if (finished) return
  finished = true
  emit('end', { reason })
  // Give the worker thread a moment to send RakNet's disconnect notification.
  setTimeout(() => process.exit(0), 200)
}

const client = createClient({
  host,
  port: Number(port),
  username,
  version,
  offline: true,
  skipPing: true,
  raknetBackend: 'jsp-raknet',
  conLog: null,
  connectTimeout: TIMEOUT_MS
})

client.on('join', () => {
  stage = 'joined'
  emit('join', {})
})
client.on('spawn', () => {
  stage = 'spawned'
  emit('spawn', {})
  // Say goodbye so the server drops the player now, not after RakNet's 10 s timeout. Not
  // with client.disconnect(): its packet leaves through the cipher stream a tick after
  // its close() has already marked the client gone, so it is never sent. These fields
  // cover every version's disconnect packet (the serializer ignores the extra ones).
  client.write('disconnect', {
    reason: 'unknown',
    hide_disconnect_reason: false,
    message: 'test done',
    filtered_message: ''
  })
  stage = 'leaving'
  setTimeout(() => client.close(), 100)
})
client.on('kick', (packet) => {
  emit('disconnect', { reason: String(packet.message ?? packet.reason ?? '') })
})
client.on('play_status', (packet) => {
  // How a server turns away a client of another version (failed_client: too old,
  // failed_spawn: too new) before any disconnect packet.
  if (String(packet.status).startsWith('failed')) emit('disconnect', { reason: packet.status })
})
client.on('error', (error) => emit('error', { message: String(error) }))
client.on('close', () => finish(stage === 'leaving' ? 'test done' : `connection closed (${stage})`))

setTimeout(() => {
  emit('timeout', { stage })
  process.exit(2)
}, TIMEOUT_MS)
