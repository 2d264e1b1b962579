'use strict'
// An offline-mode Minecraft server (npm minecraft-protocol) for discoproxy's integration
// tests: `node mc_server.js <name> <version>`. It listens on 127.0.0.1 on a port the OS
// picks and prints one JSON object per line on stdout, so the test can read what it saw:
//   {"event":"listening","server":"A","port":43123}
//   {"event":"status","server":"A","host":"eu.lobby.example.com"}
//   {"event":"login","server":"A","username":"tester","host":"survival.example.com"}
// The MOTD is "backend-<name>", so a status ping shows which backend answered.
const mc = require('minecraft-protocol')

const [name, version] = process.argv.slice(2)
const emit = (event, fields) => console.log(JSON.stringify({ event, server: name, ...fields }))

const server = mc.createServer({
  'online-mode': false,
  // MC_HOST/MC_PORT: in a container (integration/test_docker_pools.py) it must listen
  // where the proxy reaches it; on the host, loopback and a port the OS picks
  host: process.env.MC_HOST || '127.0.0.1',
  port: Number(process.env.MC_PORT || 0),
  version,
  motd: `backend-${name}`,
  hideErrors: true,
  beforePing: (response, client) => {
    emit('status', { host: client.serverHost })
    return response
  }
})
const mcData = require('minecraft-data')(server.version)

server.on('playerJoin', (client) => {
  // The smallest play-state start a client accepts (examples/server/server.js upstream).
  client.write('login', {
    ...mcData.loginPacket,
    enforceSecureChat: false,
    entityId: client.id,
    isHardcore: false,
    gameMode: 0,
    previousGameMode: 1,
    hashedSeed: [0, 0],
    maxPlayers: server.maxPlayers,
    viewDistance: 10,
    reducedDebugInfo: false,
    enableRespawnScreen: true,
    isDebug: false,
    isFlat: false
  })
  emit('login', { username: client.username, host: client.serverHost })
})

server.on('error', (error) => emit('error', { message: String(error) }))
server.on('listening', () => emit('listening', { port: server.socketServer.address().port }))
