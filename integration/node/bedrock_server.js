'use strict'
// An offline-mode Minecraft Bedrock Edition server (npm bedrock-protocol) for discoproxy's
// UDP integration tests: `node bedrock_server.js <name> <version> [port]`. It listens on
// 127.0.0.1, on UDP <port> or, without one, on a port the OS picks, and prints one JSON
// object per line on stdout, like mc_server.js:
//   {"event":"listening","server":"A","port":43123}
//   {"event":"ping","server":"A"}                        an unconnected ping was answered
//   {"event":"join","server":"A","username":"tester"}    login + encryption handshake done
//   {"event":"leave","server":"A","username":"tester"}   that player's connection closed
//   {"event":"error","server":"A","message":"…"}
// The MOTD (and level name) in its ping answer is "backend-<name>", so a status ping shows
// which backend answered; `mcstatus`' BedrockServer(...).status().motd reads it.
//
// After a join it runs the resource-pack exchange and then sends play_status player_spawn,
// which is what bedrock-protocol's client waits for to emit 'spawn' (see
// bedrock_client.js). It sends no start_game/chunks (upstream's examples replay packets
// dumped from a vanilla server for that), so a real game client would not render a world,
// and the library's server-side 'spawn' event (set_local_player_as_initialized, which its
// client sends only after start_game) never comes: the server stops at "join".
//
// Notes for whoever touches integration/node (see also bedrock_client.js):
// - RakNet is the pure-JS one (raknetBackend: 'jsp-raknet'); bedrock-protocol defaults to
//   'raknet-native', a C++ addon whose install script compiles it with cmake-js (its
//   prebuilt binary matches only Linux 5.x kernels). package.json's "allowScripts" denies
//   that script: npm 11.19 (this machine's) skips it, so `npm ci` needs no compiler and
//   takes ~15 s; an npm without allowScripts compiles it (~40 s, with cmake, g++ and
//   Node's headers, all on this machine; no download). Unbuilt, require('raknet-native')
//   throws, and bedrock-protocol's index loads it eagerly (src/createClient.js), hence
//   the fallback in loadBedrock() below.
// - createServer() turns port 0 into 19132, so this builds the Server itself and listens.
// - jsp-raknet speaks RakNet protocol 10 and bedrock-protocol's client uses it too; a real
//   Bedrock 1.19.30+ client (RakNet 11) would not get past the RakNet handshake here.
const [name, version, portArg] = process.argv.slice(2)
const emit = (event, fields) => console.log(JSON.stringify({ event, server: name, ...fields }))

function loadBedrock () {
  const Module = require('module')
  const load = Module._load
  Module._load = function (request, ...rest) {
    if (request !== 'raknet-native') return load.call(this, request, ...rest)
    try {
      return load.call(this, request, ...rest)
    } catch {
      return {} // not built: fine, only the 'raknet-native' backend would use it
    }
  }
  try {
    return require('bedrock-protocol')
  } finally {
    Module._load = load
  }
}

if (!name || !version) {
  console.error('usage: node bedrock_server.js <name> <version> [port]')
  process.exit(64)
}

const { Server } = loadBedrock()
const motd = `backend-${name}`
const server = new Server({
  host: '127.0.0.1',
  port: Number(portArg || 0),
  version,
  offline: true,
  raknetBackend: 'jsp-raknet',
  maxPlayers: 10,
  motd: { motd, levelName: motd }
})

server.on('connect', (client) => {
  client.on('error', (error) => emit('error', { message: String(error) }))
  client.on('join', () => {
    emit('join', { username: client.profile?.name })
    // Fields for every supported version at once: the serializer takes the ones the
    // version's packet has and ignores the rest.
    client.write('resource_packs_info', {
      must_accept: false,
      has_addons: false,
      has_scripts: false,
      force_server_packs: false,
      disable_vibrant_visuals: false,
      world_template: { uuid: '00000000-0000-0000-0000-000000000000', version: '' },
      behaviour_packs: [],
      texture_packs: [],
      resource_pack_links: []
    })
    client.once('resource_pack_client_response', () => {
      client.write('resource_pack_stack', {
        must_accept: false,
        behavior_packs: [],
        resource_packs: [],
        game_version: '',
        experiments: [],
        experiments_previously_used: false,
        has_editor_packs: false
      })
      client.once('resource_pack_client_response', () => {
        client.write('play_status', { status: 'player_spawn' })
      })
    })
  })
  // A player that says goodbye: drop its RakNet connection now rather than on its timeout.
  client.on('disconnect', () => client.connection.disconnect('client disconnect'))
  client.on('close', () => emit('leave', { username: client.profile?.name }))
})
server.on('error', (error) => emit('error', { message: String(error) }))

// jsp-raknet 2.2's server, as bedrock-protocol 3.59 uses it, serves one player, once, and
// only on the port the player dialled:
// - its InetAddress has no toString(), and bedrock-protocol keys players by address, so
//   every player is "[object Object]" and a second one takes over the first one's slot;
// - Connection.disconnect() (on a client's disconnect notification, or after 10 s without
//   a datagram from it) calls close() on the whole server, which then answers nothing;
// - it opens a connection only if the server address that the client names in its
//   NewIncomingConnection has the port the server is bound to, so nobody gets in through
//   a proxy on another port (vanilla RakNet ignores that field).
// All three are mended below: addresses print as "ip/port", a connection that ends is
// only dropped (and reported to bedrock-protocol, which closes that player), and the
// named port is taken as the bound one. These reach into jsp-raknet's js/ files: the
// lockfile pins jsp-raknet 2.2.0.
require('jsp-raknet/js/utils/InetAddress').default.prototype.toString = function () {
  return this.hash
}
const NewIncomingConnection = require('jsp-raknet/js/protocol/NewIncomingConnection').default

server.listen().then(() => {
  const rak = server.raknet.raknet // jsp-raknet's Server
  const port = rak.socket.address().port
  const decodeNewIncoming = NewIncomingConnection.from
  NewIncomingConnection.from = (buffer) => {
    const packet = decodeNewIncoming.call(NewIncomingConnection, buffer)
    packet.address.port = port
    return packet
  }
  const openConnection = rak.handleOpenConnectionRequest2.bind(rak)
  rak.handleOpenConnectionRequest2 = (buffer, address) => {
    const reply = openConnection(buffer, address)
    const conn = rak.connections.get(address.hash)
    conn.disconnect = (reason = 'unknown') => {
      if (rak.connections.get(address.hash) !== conn) return
      conn.state = 3 // Disconnected
      rak.connections.delete(address.hash)
      // bedrock-protocol's own 'closeConnection' listener is a no-op bound before listen()
      // set the real one, so call that directly.
      server.raknet.onCloseConnection(conn, reason)
    }
    return reply
  }
  // It also throws from its socket handler on a malformed datagram (an empty one, or an
  // offline message without RakNet's magic), which would end the process: report instead.
  const handle = rak.handle.bind(rak)
  rak.handle = (buffer, sender) => {
    try {
      handle(buffer, sender)
    } catch (error) {
      emit('error', { message: `bad datagram from ${sender.hash}: ${error}` })
    }
  }
  rak.on('unconnectedPong', () => emit('ping', {}))
  // Advertise the real port, as a vanilla server does (it was built with the 0 asked for).
  server.advertisement.portV4 = server.advertisement.portV6 = port
  server.raknet.updateAdvertisement()
  emit('listening', { port })
}, (error) => {
  emit('error', { message: String(error) })
  process.exit(1)
})
